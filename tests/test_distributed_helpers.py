"""The torchrun helpers that need no process group: per-process streams, errors, reporting."""

import click
import pytest
import torch

from bnprobe.cli._common import run_guarded
from bnprobe.distributed import World, rank_stream, shard_slice, shared_errors
from bnprobe.errors import BnprobeError, SharedError


def test_rank_stream_keeps_process_zero_and_separates_the_others():
    def draws(rank):
        g = rank_stream(torch.Generator().manual_seed(5), rank)
        return torch.rand(1000, generator=g)

    assert torch.equal(draws(0), torch.rand(1000, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(draws(1), draws(1))  # reproducible
    streams = [draws(r) for r in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert abs(torch.corrcoef(torch.stack([streams[a], streams[b]]))[0, 1]) < 0.1


def test_shard_slices_cover_the_draws_once():
    for n, size in ((120, 2), (7, 3), (5, 5)):
        parts = [range(n)[shard_slice(n, World(r, size))] for r in range(size)]
        assert [i for p in parts for i in p] == list(range(n))


def test_shared_errors_alone_raise_the_error_itself():
    with pytest.raises(BnprobeError) as info, shared_errors():
        raise BnprobeError("bad")
    assert type(info.value) is BnprobeError
    with shared_errors():
        pass


@pytest.mark.parametrize("rank,error,printed", [
    ("0", SharedError("bad"), True), ("1", SharedError("bad"), False),  # process 0 reports
    ("1", BnprobeError("bad"), True),  # raised on one process only: it reports
])
def test_errors_raised_everywhere_are_reported_by_process_zero(monkeypatch, capsys, rank, error, printed):
    monkeypatch.setenv("RANK", rank)

    def fail():
        raise error

    with pytest.raises(SystemExit) as info:
        run_guarded(click.Context(click.Command("x")), fail)
    assert info.value.code == 2
    assert (capsys.readouterr().err == "Error: bad\n") == printed
