"""``bnprobe study``: bad study files fail with one Error line before anything runs; --dry-run."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.study import load_study, order
from bnprobe.study.spec import EVAL_SUFFIX

HEAD = """
[study]
seeds = [0, 1]

[defaults.train]
dataset = "digits"
width = 0.25
epochs = 1
limit-train = 64
"""

GOOD = HEAD + """
[[run]]
name = "bn"
command = "train"
options = { norm = "bn" }

[[run]]
name = "meas"
command = "measure"
checkpoint = "bn"
options = { batch-sizes = [8, 16], samples = 5 }

[[run]]
name = "wn-noise"
command = "retrain"
noise = "meas"
options = { norm = "wn", noise-scale = 2.0, no-augment = true, precise-bn = false }

[[run]]
name = "bn-param"
command = "evaluate"
target = "bn"
noise = "meas"
options = { mc = [10] }
"""


def _write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _study(tmp_path, text, *extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["study", str(_write(tmp_path, text)), "--out", str(out), *extra])
    return result, out


def _assert_one_error(result, out, *words):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()  # nothing ran, nothing was written


def test_unknown_option(tmp_path):
    result, out = _study(tmp_path, GOOD.replace('noise-scale = 2.0', 'noise-scael = 2.0'))
    _assert_one_error(result, out, "unknown option", "noise-scael", "retrain")


def test_unknown_option_in_defaults(tmp_path):
    result, out = _study(tmp_path, GOOD.replace("limit-train = 64", "limit-trian = 64"))
    _assert_one_error(result, out, "[defaults.train]", "limit-trian")


def test_bad_option_value_is_checked_by_the_command(tmp_path):
    result, out = _study(tmp_path, GOOD.replace("epochs = 1", 'epochs = "many"'))
    _assert_one_error(result, out, "many", "epochs")
    result, out = _study(tmp_path, GOOD.replace('norm = "bn"', 'norm = "xn"'))
    _assert_one_error(result, out, "'xn'", "bn")


def test_cycle(tmp_path):
    text = HEAD + """
    [[run]]
    name = "a"
    command = "train"
    noise = "m"

    [[run]]
    name = "m"
    command = "measure"
    checkpoint = "a"
    """
    result, out = _study(tmp_path, text)
    _assert_one_error(result, out, "cycle", "a -> m -> a")


def test_cycle_through_after(tmp_path):
    text = HEAD + """
    [[run]]
    name = "a"
    command = "train"
    after = ["b"]

    [[run]]
    name = "b"
    command = "train"
    after = ["a"]
    """
    result, out = _study(tmp_path, text, "--dry-run")
    _assert_one_error(result, out, "cycle")


def test_missing_dependency(tmp_path):
    result, out = _study(tmp_path, GOOD.replace('checkpoint = "bn"', 'checkpoint = "bm"'))
    _assert_one_error(result, out, "'bm'", "missing dependency")


def test_dependency_of_the_wrong_kind(tmp_path):
    result, out = _study(tmp_path, GOOD.replace('noise = "meas"\noptions = { norm = "wn"',
                                                'noise = "bn"\noptions = { norm = "wn"'))
    _assert_one_error(result, out, "noise", "measure run")


def test_duplicate_run_name(tmp_path):
    result, out = _study(tmp_path, GOOD + '\n[[run]]\nname = "bn"\ncommand = "train"\n')
    _assert_one_error(result, out, "duplicate run name", "'bn'")


def test_reserved_option_and_unknown_key(tmp_path):
    result, out = _study(tmp_path, GOOD.replace('{ norm = "bn" }', '{ norm = "bn", seed = 3 }'))
    _assert_one_error(result, out, "seed", "seeds = [...]")
    text = GOOD.replace('command = "measure"', 'command = "measure"\nchekpoint = "x"')
    result, out = _study(tmp_path, text)
    _assert_one_error(result, out, "unknown key", "chekpoint")


def test_not_toml_and_missing_file(tmp_path):
    result, out = _study(tmp_path, "[study\nname =")
    _assert_one_error(result, out, "not a valid TOML file")
    result = CliRunner().invoke(cli, ["study", str(tmp_path / "nope.toml"), "--out", str(out)])
    _assert_one_error(result, out, "not found")


def test_expansion_and_order(tmp_path):
    study = load_study(_write(tmp_path, GOOD))
    assert list(study.runs) == ["bn", "meas", "wn-noise", "bn-param"]
    names = set(study.steps)
    for seed in (0, 1):
        assert {f"bn-s{seed}", f"bn-s{seed}{EVAL_SUFFIX}", f"meas-s{seed}", f"wn-noise-s{seed}",
                f"wn-noise-s{seed}{EVAL_SUFFIX}", f"bn-param-s{seed}"} <= names
    assert study.steps["wn-noise-s1"].refs == {"noise": "meas-s1"}  # same seed
    steps = order(study)
    position = {s.name: i for i, s in enumerate(steps)}
    for step in steps:
        assert all(position[d] < position[step.name] for d in step.deps)
    args = study.steps["wn-noise-s0"].args("D", study.steps)
    assert args[:3] == ["retrain", "--noise", "D/runs/meas-s0/fitted.json"]
    assert "--no-augment" in args and "--no-precise-bn" in args
    assert args[-4:] == ["--seed", "0", "--out", "D/runs/wn-noise-s0"]


def test_dry_run_prints_commands_in_order_and_runs_nothing(tmp_path):
    result, out = _study(tmp_path, GOOD, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 12 and all(ln.startswith("bnprobe ") for ln in lines)
    first = {kind: next(i for i, ln in enumerate(lines) if ln.startswith(f"bnprobe {kind} "))
             for kind in ("train", "measure", "retrain", "evaluate")}
    assert first["train"] < first["measure"] < first["retrain"]
    measure = next(ln for ln in lines if ln.startswith("bnprobe measure") and "--seed 1" in ln)
    assert measure.split()[2] == str(out / "runs" / "bn-s1")
    assert lines.index(measure) > next(i for i, ln in enumerate(lines) if f"--out {out}/runs/bn-s1" in ln)
    assert not out.exists()


@pytest.mark.parametrize("seeds, noise_of_seed_1",
                         [("[0]", "meas-s0"), ("[0, 1]", "meas-s1"), ("[5]", "meas-s5"), ("[5, 6]", None)])
def test_a_single_seed_run_serves_every_seed(tmp_path, seeds, noise_of_seed_1):
    text = GOOD.replace('command = "measure"', f'command = "measure"\nseeds = {seeds}', 1)
    text = text.replace('checkpoint = "bn"', 'checkpoint = "bn-s0"')  # an explicit step of run bn
    if noise_of_seed_1:
        study = load_study(_write(tmp_path, text))
        assert study.steps["wn-noise-s1"].refs == {"noise": noise_of_seed_1}
        assert study.steps[noise_of_seed_1].refs == {"checkpoint": "bn-s0"}
    else:
        result, out = _study(tmp_path, text, "--dry-run")
        _assert_one_error(result, out, "'meas' has no seed 0")
