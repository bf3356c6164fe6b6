import torch
from click.testing import CliRunner

from bnprobe.checkpoint import open_checkpoint
from bnprobe.cli.main import cli
from bnprobe.measure import find_bn_layers
from bnprobe.training import TrainConfig, train


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_recalibrate_writes_population_buffers(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(dataset="synthetic", width=0.25, epochs=1, device="cpu", mc_every=0), run)
    code, text = _run("recalibrate", run, "--quiet")
    assert code == 0, text
    out = run / "checkpoint-precise.pt"
    assert out.is_file() and "wrote" in text
    before, after = open_checkpoint(run), open_checkpoint(out)
    assert after.payload["precise_bn"]["buffers"] == "population"
    changed = [not torch.equal(a.running_mean, b.running_mean)
               for (_, a), (_, b) in zip(find_bn_layers(before.model), find_bn_layers(after.model))]
    assert all(changed)
    # parameters untouched, only buffers
    for (n, p), (_, q) in zip(before.model.named_parameters(), after.model.named_parameters()):
        assert torch.equal(p, q), n
    # never overwritten silently; the checkpoint itself is refused as --out
    code, text = _run("recalibrate", run, "--quiet")
    assert code == 2 and text.startswith("Error:") and "already exists" in text
    code, text = _run("recalibrate", run, "--out", run / "checkpoint.pt", "--force", "--quiet")
    assert code == 2 and "checkpoint itself" in text
    code, text = _run("recalibrate", tmp_path / "missing.pt")
    assert code == 2 and "not found" in text
    code, text = _run("evaluate", out, "--mc", "2", "--out", tmp_path / "ev", "--quiet")
    assert code == 0, text
    assert "BN buffers: population statistics" in text
