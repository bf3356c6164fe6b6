"""The benchmark scripts run (tiny sizes): they import library internals that may move."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.parametrize("script,args", [
    ("evaluate.py", ["--n", "16", "--samples", "2", "--repeats", "1"]),
    ("train_step.py", ["--steps", "1", "--repeats", "1", "--batch-size", "4"]),
])
def test_benchmark_script_runs(script, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, script, *args], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio" in done.stdout
