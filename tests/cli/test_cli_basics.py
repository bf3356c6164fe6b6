import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from bnprobe.cli.main import cli


def _run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output  # stdout and stderr together


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, bnprobe.cli.main; assert 'torch' not in sys.modules and 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bnprobe", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - t0 < 1.5


def test_version():
    code, out = _run("-V")
    assert code == 0 and "bnprobe" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "--norm", "foo"], "'foo'"),
    (["train", "--batch-size", "1"], "batch-size"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "not found"),
    (["train", "--dataset", "imagefolder", "--data-root", "/nonexistent"], "not found"),
    (["train", "--device", "tpu"], "'tpu'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    code, out = _run(*args, "--out", str(tmp_path / "run"))
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]
    assert "Traceback" not in out


def test_debug_shows_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bnprobe", "--debug", "train", "--norm", "foo",
                             "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_train_command_and_existing_run(tmp_path):
    args = ["train", "--dataset", "synthetic", "--width", "0.25", "--epochs", "1", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "run")]
    code, out = _run(*args)
    assert code == 0, out
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    code, out = _run(*args)
    assert code == 2 and "already holds a run" in out
    code, out = _run(*args[:-3], "--epochs", "2", "--resume", "--out", str(tmp_path / "run"))
    assert code == 0, out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_malformed_list_names_the_bad_element():
    from click.testing import CliRunner

    from bnprobe.cli.main import cli

    result = CliRunner().invoke(cli, ["measure", "x.pt", "--batch-sizes", "8,abc"])
    assert result.exit_code == 2
    assert "'abc' is not an integer" in result.output and "must be a int" not in result.output


def test_commands_do_not_import_torchvision_until_a_model_needs_it():
    """torchvision costs about 2 s of CPU per process (every study step); All-CNN never needs it.
    A network with torchvision's StochasticDepth still gets its moment rule once it is loaded."""
    code = (
        "import sys\n"
        "import bnprobe.cli.evaluate, bnprobe.evaluation.run, bnprobe.training, bnprobe.measure.pipeline\n"
        "from bnprobe.models import build_model\n"
        "build_model('allcnn', {'num_classes': 10, 'width': 0.25, 'norm': 'an'})\n"
        "assert 'torchvision' not in sys.modules\n"
        "from torchvision.ops import StochasticDepth\n"
        "from bnprobe.norms.an_rules import module_rule, supported\n"
        "assert module_rule(StochasticDepth(0.1, 'row')) is not None and 'StochasticDepth' in supported()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
