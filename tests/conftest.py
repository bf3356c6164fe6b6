"""Shared fixtures: tiny data sets, a tiny digits BN run, torchrun, the real CIFAR-10 JPEGs if present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnprobe.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def tiny_data():
    """A learnable 3x8x8 four-class dataset with 96 training images."""
    return make_synthetic(n_train=96, n_test=32, channels=3, size=8, num_classes=4, seed=0)


@pytest.fixture(scope="session")
def cifar_jpeg_root(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEGs unpacked into a temporary folder (skips when absent)."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not available ({CIFAR_ARCHIVE} missing)")
    root = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "xzf", str(CIFAR_ARCHIVE), "-C", str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def digits_bn_run(tmp_path_factory) -> Path:
    """A tiny BN All-CNN trained one epoch on 256 digits (``bnprobe train --dataset digits ...``)."""
    from bnprobe.training import TrainConfig, train

    out = tmp_path_factory.mktemp("digits-bn")
    train(TrainConfig(dataset="digits", epochs=1, limit_train=256, width=0.25, device="cpu"), out)
    return out


@pytest.fixture(scope="session")
def torchrun():
    """Run ``torchrun --standalone --nproc-per-node N ARGS`` (2 gloo processes on the CPU by default).

    The processes import this checkout's bnprobe and use one thread each (pass ``--device
    cpu`` for gloo on a machine with GPUs); returns the CompletedProcess (text stdout, stderr).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def run(*args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *[str(a) for a in args]]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    return run


@pytest.fixture(scope="session")
def ddp_commands(torchrun, tmp_path_factory):
    """Run a plan of ``bnprobe`` commands in one 2-process torchrun job (see tests/ddp_cli.py).

    Returns one dict per command: its ``stdout`` and ``stderr`` (both processes') and the
    ``exit`` status of each process.
    """
    from ddp_cli import exit_codes, split  # tests/ is on sys.path, as the folder of this file

    def run(plan: list[dict]) -> list[dict]:
        path = tmp_path_factory.mktemp("plan") / "plan.json"
        path.write_text(json.dumps(plan, default=str))
        job = torchrun(REPO / "tests" / "ddp_cli.py", path)
        codes = exit_codes(job.stderr)
        assert job.returncode == 0 and len(codes) == 2 * len(plan), job.stdout + job.stderr
        out, err = split(job.stdout, len(plan)), split(job.stderr, len(plan))
        return [{"stdout": out[i], "stderr": err[i], "exit": [codes[(i, r)] for r in range(2)]}
                for i in range(len(plan))]

    return run
