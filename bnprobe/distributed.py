"""Running under torchrun: the process group, this process's rank and device, and collectives.

bnprobe scales out with PyTorch's own engine. ``torchrun --nproc-per-node N -m bnprobe train
...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup`
joins the process group (gloo on CPU, nccl on CUDA with one device per process). Without
torchrun (or with one process) everything here is a no-op and bnprobe runs as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .errors import BnprobeError, SharedError
from .options import resolve_device

__all__ = ["RANK_SEED_STRIDE", "World", "all_gather_cat", "all_gather_objects", "all_reduce_sum",
           "barrier", "broadcast_buffers", "broadcast_object", "rank_stream", "setup", "shard_slice",
           "shared_errors", "shutdown", "world"]

#: Seed offset between the independent random streams of two processes of one run.
RANK_SEED_STRIDE = 1000


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of a run.

    Attributes:
        rank: This process's index (0 writes the run files).
        size: Number of processes.
        local_rank: Index on this machine (the CUDA device it uses).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError as exc:
        raise BnprobeError(f"environment variable {name}={value!r} is not an integer") from exc


def world() -> World:
    """The current world: from the process group when one is initialized, else single."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     _env_int("LOCAL_RANK", 0))
    return World()


def setup(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group started by torchrun (if any) and pick this process's device.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        ``(world, device)``; with more than one process on CUDA, device ``cuda:LOCAL_RANK``.

    Raises:
        BnprobeError: When torch.distributed is unavailable, or more processes than CUDA
            devices share a machine.
    """
    size = _env_int("WORLD_SIZE", 1)
    dev = resolve_device(device)
    if size <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return World(), dev
    if not torch.distributed.is_available():
        raise BnprobeError("this PyTorch build has no torch.distributed: run one process")
    local = _env_int("LOCAL_RANK", 0)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise BnprobeError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} "
                               "CUDA devices: start at most one process per device")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world(), dev


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if world().distributed:
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes (a new tensor; the input alone without a group)."""
    if not world().distributed:
        return tensor
    out = tensor.detach().clone()
    torch.distributed.all_reduce(out)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (picklable objects)."""
    if not world().distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every process the buffers (e.g. BN running statistics) of process ``src``."""
    if not world().distributed:
        return
    for b in model.buffers():
        torch.distributed.broadcast(b, src=src)


def shard_slice(n: int, w: World | None = None) -> slice:
    """The contiguous part of ``range(n)`` that this process handles (sizes differ by <= 1)."""
    w = w or world()
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (1 if w.rank < extra else 0))


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every process's ``tensor`` (sizes along ``dim`` may differ), concatenated in rank order.

    The result is on ``tensor``'s device; alone, ``tensor`` itself.
    """
    if not world().distributed:
        return tensor
    parts = all_gather_objects(tensor.detach().cpu())
    return torch.cat(parts, dim).to(tensor.device)


def rank_stream(generator: torch.Generator, rank: int | None = None) -> torch.Generator:
    """Move ``generator`` (in place) to a random stream of process ``rank``'s own.

    Process 0 keeps its stream, so one process draws what it draws without torchrun; process
    ``r > 0`` reseeds with the stream's next 62-bit value plus ``RANK_SEED_STRIDE * r``
    (independent of process 0's continuation and of every other process).

    Args:
        generator: A CPU or device generator, in the same state on every process.
        rank: The process (default: this one).

    Returns:
        ``generator``.
    """
    rank = world().rank if rank is None else rank
    if rank > 0:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        generator.manual_seed(seed + RANK_SEED_STRIDE * rank)
    return generator


@contextlib.contextmanager
def shared_errors() -> Iterator[None]:
    """A :class:`BnprobeError` inside the block on any process is raised on every process.

    At the end of the block the processes compare notes (one collective; no-op alone): if
    any raised, every process raises :class:`SharedError` with the message of the first one
    (prefixed ``process r:`` when it is not process 0), which process 0 reports and the
    others do not print. Use it around input checks before collectives, so that bad input
    ends every process with one line instead of leaving the others waiting. The block must
    itself run no collective. Other exceptions are not caught: torchrun stops the job when
    a process fails.
    """
    error: BnprobeError | None = None
    try:
        yield
    except BnprobeError as exc:
        if not world().distributed:
            raise
        error = exc
    if not world().distributed:
        return
    messages = all_gather_objects(None if error is None else str(error))
    for rank, message in enumerate(messages):
        if message is not None:
            raise SharedError(message if rank == 0 else f"process {rank}: {message}") from error
