"""Study files: parse and validate the TOML into steps, each one plain bnprobe command.

A study file names runs (``[[run]]``): a bnprobe command (train, retrain, measure or
evaluate), its options as written on the command line, the seeds it is repeated for, and the
runs it needs (``checkpoint``, ``target``, ``noise``, ``after``). Each run expands into one
step per seed (``bn`` with seeds 0, 1 becomes ``bn-s0``, ``bn-s1``); every train and retrain
step is followed by an automatic ``evaluate`` step unless the run says ``evaluate = false``.
Everything is checked before anything runs: unknown keys and options (against the click
command's own parameters, with its own type conversion), references to runs that do not
exist, duplicate names; the plan module checks for cycles.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import BnprobeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9/3.10 only
    import tomli as tomllib

COMMANDS = ("train", "retrain", "measure", "evaluate")
TRAINING = ("train", "retrain")
#: Options the study sets itself (per step), never the study file.
RESERVED = {"out": "the study puts every step's output under --out DIR",
            "seed": "use seeds = [...]", "resume": "use bnprobe study --resume",
            "force": "the study decides", "quiet": "the study decides", "help": "not an option"}
#: Run fields that name another run, by command, and what they must name.
REF_FIELDS = {
    "train": {"noise": "measure"},
    "retrain": {"noise": "measure"},
    "measure": {"checkpoint": TRAINING},
    "evaluate": {"target": TRAINING, "noise": "measure"},
}
REQUIRED_REF = {"measure": "checkpoint", "evaluate": "target"}
RUN_KEYS = {"name", "command", "options", "seeds", "after", "evaluate", "label"} | {
    f for fields in REF_FIELDS.values() for f in fields}
STUDY_KEYS = {"name", "description", "seeds"}
TOP_KEYS = {"study", "defaults", "run", "report"}
REPORT_KEYS = {"title", "mc", "baseline", "methods"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RUNS_DIR = "runs"
EVAL_SUFFIX = ".evaluate"
# Choice-like options checked early with bnprobe's own enums (the commands take plain strings).
_CHOICES = {"norm": "Norm", "learn_noise": "LearnNoise", "noise_granularity": "NoiseGranularity",
            "optimizer": "Optimizer", "dataset": "DatasetName", "split": "Split"}


def click_command(kind: str) -> click.Command:
    """The click command of a step kind (imports only the CLI module, not the library)."""
    import importlib

    return importlib.import_module(f"bnprobe.cli.{kind}").command


@dataclass
class Step:
    """One plain bnprobe command of a study.

    Attributes:
        name: Unique step name: ``<run>-s<seed>``, plus ``.evaluate`` for an automatic evaluation.
        method: The run (method) it belongs to; the report groups seeds by it.
        seed: The seed passed as ``--seed``.
        command: train, retrain, measure or evaluate.
        options: Option tokens after the command (every option of the study file, converted).
        refs: Run field (checkpoint, target, noise) to the step it names.
        after: Further steps that must finish first (ordering only).
        out: The output folder, relative to the study folder.
        auto: True for the evaluation that follows a training run automatically.
        index: Position in the study file's order (ties in scheduling go to the lower).
    """

    name: str
    method: str
    seed: int
    command: str
    options: list[str]
    refs: dict[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    out: str = ""
    auto: bool = False
    index: int = 0

    @property
    def deps(self) -> list[str]:
        """Every step this one waits for."""
        return list(dict.fromkeys([*self.refs.values(), *self.after]))

    def args(self, root: str | Path, steps: dict[str, Step]) -> list[str]:
        """The command line after ``bnprobe``, with outputs under ``root``."""
        root = Path(root)
        args = [self.command]
        if self.command == "measure":
            args.append(str(root / steps[self.refs["checkpoint"]].out))
        elif self.command == "evaluate":
            args.append(str(root / steps[self.refs["target"]].out))
        if "noise" in self.refs:
            args += ["--noise", str(root / steps[self.refs["noise"]].out / "fitted.json")]
        return [*args, *self.options, "--seed", str(self.seed), "--out", str(root / self.out)]

    def signature(self, steps: dict[str, Step]) -> list[str]:
        """The command line with the study folder written as ``DIR`` (compared on --resume)."""
        return self.args("DIR", steps)


@dataclass
class ReportSpec:
    """The ``[report]`` section.

    Attributes:
        title: Heading of report.md (default: the study's name).
        mc: The Monte-Carlo sample count reported as "NLL MC-N" (must be evaluated).
        baseline: The method drawn as the reference line of the noise-scale figure.
        methods: Report order of the methods (default: the study file's order).
    """

    title: str = ""
    mc: int = 10
    baseline: str | None = None
    methods: list[str] = field(default_factory=list)


@dataclass
class Study:
    """A parsed, validated study.

    Attributes:
        path: The study file.
        sha256: Its sha256.
        name: ``[study] name`` (default: the file's stem).
        description: ``[study] description``.
        seeds: The default seeds.
        runs: Run name to its table (as written, with ``command`` and resolved ``seeds``).
        steps: Step name to step, in the study file's order.
        report: The report section.
    """

    path: Path
    sha256: str
    name: str
    description: str
    seeds: list[int]
    runs: dict[str, dict[str, Any]]
    steps: dict[str, Step]
    report: ReportSpec


def _fail(message: str) -> BnprobeError:
    return BnprobeError(message)


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise _fail(f"{where}: seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(f"{where}: seeds {value!r} repeat a seed")
    return list(value)


def _options_index(command: click.Command) -> dict[str, tuple[click.Parameter, bool]]:
    """Option spelling (without dashes) to (parameter, negated)."""
    index: dict[str, tuple[click.Parameter, bool]] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for opt in param.opts:
            index[opt.lstrip("-")] = (param, False)
        for opt in param.secondary_opts:
            index[opt.lstrip("-")] = (param, True)
    return index


def _normalize_options(kind: str, options: Any, where: str) -> dict[str, tuple[click.Option, Any]]:
    """``{key: value}`` of a study file to ``{param name: (param, value)}`` (flags resolved)."""
    if not isinstance(options, dict):
        raise _fail(f"{where}: options must be a table, got {options!r}")
    command = click_command(kind)
    index = _options_index(command)
    arguments = {p.name for p in command.params if isinstance(p, click.Argument)}
    out: dict[str, tuple[click.Option, Any]] = {}
    for key, value in options.items():
        spelled = str(key).lstrip("-").replace("_", "-")
        if spelled.replace("-", "_") in arguments:
            raise _fail(f"{where}: {key!r} is the command's argument; name the run with "
                        f"{REQUIRED_REF.get(kind, 'checkpoint')} = \"RUN\"")
        if spelled not in index:
            raise _fail(f"{where}: unknown option {key!r} for 'bnprobe {kind}' (see 'bnprobe {kind} --help')")
        param, negated = index[spelled]
        if param.name in RESERVED:
            raise _fail(f"{where}: option {key!r} is set by the study ({RESERVED[param.name]})")
        if isinstance(value, dict):
            raise _fail(f"{where}: option {key!r} has a table as value")
        if param.is_flag and not param.count:
            if not isinstance(value, bool):
                raise _fail(f"{where}: option {key!r} is a flag: write true or false, not {value!r}")
            value = (not value) if negated else value
        elif isinstance(value, bool):
            raise _fail(f"{where}: option {key!r} takes a value, not {value!r}")
        if param.name in out:
            raise _fail(f"{where}: option {key!r} is given twice")
        out[param.name] = (param, value)
    return out


def _token(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_token(v) for v in value)
    return str(value)


def _option_tokens(options: dict[str, tuple[click.Option, Any]]) -> list[str]:
    tokens: list[str] = []
    for param, value in options.values():
        if param.is_flag and not param.count:
            if value:
                tokens.append(param.opts[0])
            elif param.secondary_opts:
                tokens.append(param.secondary_opts[0])
            continue
        tokens += [param.opts[0], _token(value)]
    return tokens


def _check_choices(options: dict[str, tuple[click.Option, Any]], where: str) -> None:
    from .. import options as enums

    for name, (param, value) in options.items():
        if name in _CHOICES and value is not None:
            try:
                getattr(enums, _CHOICES[name]).parse(str(value), param.opts[0].lstrip("-"))
            except BnprobeError as exc:
                raise _fail(f"{where}: {exc}") from None


def _check_command_line(kind: str, tokens: list[str], where: str) -> None:
    """Parse the command line with the click command itself (types, ranges), without running it."""
    command = click_command(kind)
    args = list(tokens)
    if kind in ("measure", "evaluate"):
        args.insert(0, "RUN_DIR")
    try:
        command.make_context(f"bnprobe {kind}", args)
    except click.ClickException as exc:
        raise _fail(f"{where}: {exc.format_message()}") from None


def _read(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise _fail(f"study file not found: {path}")
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(f"{path} is not a valid TOML file: {exc}") from None
    return doc, hashlib.sha256(raw).hexdigest()


def _defaults(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise _fail("[defaults] must be a table of tables ([defaults.train], ...)")
    _check_keys(defaults, set(COMMANDS), "[defaults]")
    for kind, table in defaults.items():
        if not isinstance(table, dict):
            raise _fail(f"[defaults.{kind}] must be a table")
    return defaults


def _merged_options(kind: str, run_options: Any, defaults: dict[str, dict[str, Any]], where: str
                    ) -> dict[str, tuple[click.Option, Any]]:
    """defaults.train (train, retrain), defaults.<kind>, then the run's own options."""
    layers = []
    if kind == "retrain":
        layers.append(("[defaults.train]", defaults.get("train", {})))
    layers.append((f"[defaults.{kind}]", defaults.get(kind, {})))
    layers.append((where, run_options))
    merged: dict[str, tuple[click.Option, Any]] = {}
    for label, table in layers:
        merged.update(_normalize_options(kind, table, label))
    return merged


def _resolve_ref(ref: Any, seed: int, runs: dict[str, dict[str, Any]], steps_of: dict[str, str],
                 allowed: str | tuple[str, ...], where: str, what: str) -> str:
    """The step a run field names for the given seed (same seed, or the run's only seed)."""
    if not isinstance(ref, str):
        raise _fail(f"{where}: {what} must name a run, got {ref!r}")
    if ref in runs:
        run = runs[ref]
        seeds = run["seeds"]
        if seed in seeds:
            target = f"{ref}-s{seed}"
        elif len(seeds) == 1:
            target = f"{ref}-s{seeds[0]}"
        else:
            raise _fail(f"{where}: {what} = {ref!r} has no seed {seed} (its seeds: {seeds})")
    elif ref in steps_of:
        target = ref
        run = runs[steps_of[ref]]
    else:
        raise _fail(f"{where}: {what} = {ref!r} is not a run of this study (missing dependency)")
    kinds = (allowed,) if isinstance(allowed, str) else allowed
    if what != "after" and run["command"] not in kinds:
        raise _fail(f"{where}: {what} = {ref!r} is a {run['command']} run; {what} must name a "
                    f"{' or '.join(kinds)} run")
    return target


def load_study(path: str | Path) -> Study:
    """Read, expand and validate a study file (not yet the dependency order: see plan).

    Raises:
        BnprobeError: naming the first problem.
    """
    path = Path(path)
    doc, sha = _read(path)
    _check_keys(doc, TOP_KEYS, str(path))
    head = doc.get("study", {})
    if not isinstance(head, dict):
        raise _fail("[study] must be a table")
    _check_keys(head, STUDY_KEYS, "[study]")
    seeds = _seeds(head.get("seeds", [0]), "[study]")
    defaults = _defaults(doc)
    for kind, table in defaults.items():
        _normalize_options(kind, table, f"[defaults.{kind}]")
    run_tables = doc.get("run", [])
    if not isinstance(run_tables, list) or not run_tables:
        raise _fail(f"{path}: no runs; add [[run]] tables with name and command")

    runs: dict[str, dict[str, Any]] = {}
    for i, table in enumerate(run_tables):
        where = f"run {i + 1}"
        if not isinstance(table, dict):
            raise _fail(f"{where}: not a table")
        name = table.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(f"{where}: name must be letters, digits, '_', '.', '+', '-', got {name!r}")
        where = f"run {name!r}"
        if name in runs:
            raise _fail(f"{where}: duplicate run name")
        _check_keys(table, RUN_KEYS, where)
        kind = table.get("command")
        if kind not in COMMANDS:
            raise _fail(f"{where}: command must be one of {', '.join(COMMANDS)}, got {kind!r}")
        for key in set(table) & {f for fields in REF_FIELDS.values() for f in fields}:
            if key not in REF_FIELDS[kind]:
                raise _fail(f"{where}: a {kind} run has no {key!r} field")
        if kind in REQUIRED_REF and REQUIRED_REF[kind] not in table:
            raise _fail(f"{where}: a {kind} run needs {REQUIRED_REF[kind]} = \"RUN\"")
        if "evaluate" in table and kind not in TRAINING:
            raise _fail(f"{where}: only train and retrain runs have an automatic evaluation")
        evaluate = table.get("evaluate", True)
        if not isinstance(evaluate, (bool, dict)):
            raise _fail(f"{where}: evaluate must be true, false or a table of evaluate options")
        after = table.get("after", [])
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise _fail(f"{where}: after must be a list of run names")
        label = table.get("label", name)
        if not isinstance(label, str):
            raise _fail(f"{where}: label must be a string")
        runs[name] = {**table, "label": label, "seeds": _seeds(table.get("seeds", seeds), where)}

    steps_of: dict[str, str] = {}  # step name -> run name
    for name, run in runs.items():
        for s in run["seeds"]:
            step = f"{name}-s{s}"
            if step in steps_of or (step in runs and step != name):
                raise _fail(f"run {name!r}: its step {step!r} has the name of another run or step "
                            "(duplicate run name)")
            steps_of[step] = name

    steps: dict[str, Step] = {}
    for name, run in runs.items():
        kind = run["command"]
        where = f"run {name!r}"
        options = _merged_options(kind, run.get("options", {}), defaults, where)
        if "noise" in run and "noise" in options:
            raise _fail(f"{where}: give noise = \"MEASURE_RUN\" or options.noise = \"FILE\", not both")
        if kind == "retrain" and "noise" not in run and "noise" not in options and \
                str(options.get("learn_noise", (None, "off"))[1]).lower() == "off":
            raise _fail(f"{where}: a retrain run needs noise = \"MEASURE_RUN\" or options learn-noise")
        _check_choices(options, where)
        tokens = _option_tokens(options)
        _check_command_line(kind, tokens + (["--noise", "fitted.json"] if "noise" in run else []), where)
        auto_tokens: list[str] | None = None
        if kind in TRAINING and run.get("evaluate", True) is not False:
            extra = run["evaluate"] if isinstance(run.get("evaluate"), dict) else {}
            auto = _merged_options("evaluate", extra, defaults, f"{where} evaluate")
            _check_choices(auto, f"{where} evaluate")
            auto_tokens = _option_tokens(auto)
            _check_command_line("evaluate", auto_tokens, f"{where} evaluate")
        for s in run["seeds"]:
            step_name = f"{name}-s{s}"
            refs = {f: _resolve_ref(run[f], s, runs, steps_of, allowed, where, f)
                    for f, allowed in REF_FIELDS[kind].items() if f in run}
            after = tuple(_resolve_ref(a, s, runs, steps_of, COMMANDS, where, "after")
                          for a in run.get("after", []))
            steps[step_name] = Step(step_name, name, s, kind, tokens, refs, after,
                                    f"{RUNS_DIR}/{step_name}", index=len(steps))
            if auto_tokens is not None:
                eval_name = step_name + EVAL_SUFFIX
                steps[eval_name] = Step(eval_name, name, s, "evaluate", auto_tokens, {"target": step_name},
                                        (), f"{RUNS_DIR}/{step_name}/evaluation", auto=True, index=len(steps))
    # an ``after`` naming a training run waits for its automatic evaluation too
    for step in steps.values():
        step.after = tuple(dict.fromkeys(
            a for dep in step.after for a in (dep, dep + EVAL_SUFFIX) if a in steps))
    report = _report(doc.get("report", {}), runs)
    return Study(path, sha, str(head.get("name", path.stem)), str(head.get("description", "")),
                 seeds, runs, steps, report)


def _report(table: Any, runs: dict[str, dict[str, Any]]) -> ReportSpec:
    if not isinstance(table, dict):
        raise _fail("[report] must be a table")
    _check_keys(table, REPORT_KEYS, "[report]")
    spec = ReportSpec(title=str(table.get("title", "")), mc=table.get("mc", 10),
                      baseline=table.get("baseline"), methods=list(table.get("methods", [])))
    if not isinstance(spec.mc, int) or isinstance(spec.mc, bool) or spec.mc < 1:
        raise _fail(f"[report]: mc must be a positive integer, got {spec.mc!r}")
    for name in [*spec.methods, *([spec.baseline] if spec.baseline is not None else [])]:
        if name not in runs:
            raise _fail(f"[report]: {name!r} is not a run of this study")
    return spec
