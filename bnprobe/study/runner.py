"""Run a study's steps as ``python -m bnprobe ...`` processes, in dependency order.

Each step is one subprocess (memory is freed when it ends, a crash stays in its step);
``jobs`` of them run at once with the CPU threads split between them (``OMP_NUM_THREADS``).
A step is finished when its output marker exists, so a rerun with ``resume`` skips it; an
interrupted train, retrain or measure continues with the command's own ``--resume``, and any
other unfinished step starts over in an emptied folder. ``DIR/study.json`` records the
study file's sha256, the bnprobe version, every command and each step's status and attempts.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .._version import __version__
from ..errors import BnprobeError
from ..io import atomic_write_json, atomic_write_text
from .plan import Plan, order
from .spec import Step, Study

STATE = "study.json"
STUDY_COPY = "study.toml"
LOGS = "logs"
LOCK = ".study.lock"
FORMAT = "bnprobe.study"
VERSION = 1
#: Seconds between polls of the running processes.
POLL = 0.1
#: Seconds a terminated step may take to exit before it is killed.
TERMINATE_GRACE = 10.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """CPU threads of each of ``jobs`` parallel steps."""
    return max(1, cpu_count() // max(1, jobs))


#: glibc malloc: keep freed large blocks in the heap instead of returning them to the OS
#: (mmap/munmap per tensor). On a CPU this halves the time of a forward pass of a small
#: All-CNN (the page faults of fresh mmap'd blocks cost as much as the arithmetic; measured
#: 720 -> 1,580 img/s at width 0.25, one thread) and leaves the results bit-identical.
#: Ignored elsewhere; values the user set are kept.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def step_env(threads: int) -> dict[str, str]:
    """The environment of a step: the CPU threads it may use, and the malloc settings."""
    env = {**MALLOC_ENV, **os.environ}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def command_line(step: Step, root: str | Path, steps: dict[str, Step]) -> str:
    """The plain shell command of a step."""
    return shlex.join(["bnprobe", *step.args(root, steps)])


# ---------------------------------------------------------------- completion markers


@dataclass
class StepState:
    """What a step's output folder says.

    Attributes:
        done: The output marker exists: nothing to run.
        extra: Arguments to add (``--resume`` to continue an interrupted run).
        clean: The folder holds an unfinished, non-resumable attempt: empty it first.
        detail: In words, for progress lines.
    """

    done: bool
    extra: tuple[str, ...] = ()
    clean: bool = False
    detail: str = ""


def _last_epoch(metrics: Path) -> int:
    try:
        with open(metrics, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return int(rows[-1]["epoch"]) if rows else 0
    except (OSError, KeyError, ValueError):
        return 0


def _planned_epochs(config: Path) -> int | None:
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["config"]["epochs"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def step_state(step: Step, root: Path) -> StepState:
    """Whether a step is finished, resumable, or must start over.

    Markers: train and retrain: ``metrics.csv`` has the last epoch of ``config.json``
    (both written by the command, metrics.csv after the epoch's checkpoint); measure:
    ``fitted.json`` (written last); evaluate: ``metrics.json`` (written last).
    """
    out = root / step.out
    present = out.is_dir() and any(out.iterdir())
    if step.command in ("train", "retrain"):
        epochs = _planned_epochs(out / "config.json")
        last = _last_epoch(out / "metrics.csv")
        if epochs is not None and last >= epochs:
            return StepState(True)
        if (out / "checkpoint.pt").is_file():
            return StepState(False, ("--resume",), detail=f"resuming after epoch {last}")
    elif step.command == "measure":
        if (out / "fitted.json").is_file():
            return StepState(True)
        if (out / ".partial").is_dir():
            return StepState(False, ("--resume",), detail="resuming the measurement")
    elif (out / "metrics.json").is_file():
        return StepState(True)
    if present:
        return StepState(False, clean=True, detail="starting over (unfinished, not resumable)")
    return StepState(False)


# ---------------------------------------------------------------- the study folder


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the step gets SIGTERM when the study process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One study process per folder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BnprobeError(f"another bnprobe study is running in {root}") from None
        yield


class _Terminated(Exception):
    """SIGTERM reached the study process."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_out_dir(root: Path, study: Study, resume: bool) -> dict[str, Any] | None:
    """Refuse a folder that is not this study's; return the recorded state on ``resume``.

    Without ``resume`` the folder must be absent or empty. With it, a folder holding
    anything must hold a study.json, and no step that has outputs may have changed its
    command (new steps are fine).
    """
    if not root.exists():
        return None
    if not root.is_dir():
        raise BnprobeError(f"--out {root} is a file")
    if not any(root.iterdir()):
        return None
    if not resume:
        raise BnprobeError(f"{root} is not empty; pass --resume to continue the study in it, "
                           "or choose another --out")
    state_path = root / STATE
    if not state_path.is_file():
        raise BnprobeError(f"{root} is not empty and holds no {STATE}: not a study folder")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BnprobeError(f"{state_path} is not valid JSON: {exc}") from None
    if state.get("format") != FORMAT:
        raise BnprobeError(f"{state_path} is not a bnprobe study state")
    recorded = state.get("steps", {})
    for name, step in study.steps.items():
        old = recorded.get(name, {}).get("signature")
        new = step.signature(study.steps)
        out = root / step.out
        if old is not None and old != new and out.exists() and any(out.iterdir()):
            raise BnprobeError(
                f"step {name!r} changed since it ran in {root} (was: {shlex.join(old)}; now: "
                f"{shlex.join(new)}); choose another --out, or delete {out} to rerun it")
    return state


class Runner:
    """Runs the steps of a study in ``root``.

    Args:
        study: The validated study.
        root: The study folder (``--out``).
        jobs: Steps run at once.
        resume: Continue a study already in ``root``.
        log: Called with progress lines.
    """

    def __init__(self, study: Study, root: str | Path, jobs: int = 1, resume: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        if jobs < 1:
            raise BnprobeError(f"--jobs must be at least 1, got {jobs}")
        self.study = study
        self.root = Path(root)
        self.jobs = jobs
        self.threads = threads_per_job(jobs)
        self.log = log or (lambda _m: None)
        self.plan = Plan(study)  # validates the order before the folder is touched
        self.previous = check_out_dir(self.root, study, resume)
        self.state: dict[str, Any] = {}
        self.running: dict[str, tuple[subprocess.Popen, Any, float, dict[str, Any]]] = {}
        self.finished = 0
        self.failed: list[str] = []
        self.skipped: list[str] = []

    # ------------------------------------------------------------ state file

    def _init_state(self) -> None:
        prev = self.previous or {}
        steps = self.study.steps
        old_steps = prev.get("steps", {})
        self.state = {
            "format": FORMAT, "version": VERSION, "bnprobe_version": __version__,
            "study": {"file": str(self.study.path), "sha256": self.study.sha256, "name": self.study.name},
            "created": prev.get("created", _now()), "updated": _now(), "status": "running",
            "jobs": self.jobs, "threads_per_job": self.threads, "cpu_count": cpu_count(),
            "python": sys.executable,
            "sessions": [*prev.get("sessions", []), {"started": _now(), "study_sha256": self.study.sha256,
                                                     "bnprobe_version": __version__, "jobs": self.jobs,
                                                     "threads_per_job": self.threads}],
            "steps": {},
        }
        for name, step in steps.items():
            old = old_steps.get(name, {})
            self.state["steps"][name] = {
                "run": step.method, "seed": step.seed, "command": command_line(step, self.root, steps),
                "signature": step.signature(steps), "depends_on": step.deps, "out": step.out,
                "log": f"{LOGS}/{name}.log", "status": "pending", "attempts": old.get("attempts", []),
            }

    def _save(self) -> None:
        self.state["updated"] = _now()
        atomic_write_json(self.root / STATE, self.state)

    def _set(self, name: str, status: str) -> None:
        self.state["steps"][name]["status"] = status
        self._save()

    # ------------------------------------------------------------ processes

    def _progress(self, word: str, name: str, extra: str = "") -> None:
        total = len(self.study.steps)
        width = len(str(total))
        self.log(f"[{self.finished:>{width}}/{total}] {word:<7s} {name}{'  ' + extra if extra else ''}")

    def _start(self, step: Step, state: StepState) -> None:
        out = self.root / step.out
        if state.clean:
            shutil.rmtree(out)
        args = [*step.args(self.root, self.study.steps), *state.extra]
        env = step_env(self.threads)
        log_path = self.root / LOGS / f"{step.name}.log"
        handle = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the step ends
        handle.write(f"=== {_now()}  {shlex.join(['bnprobe', *args])}  (OMP_NUM_THREADS={self.threads})\n")
        handle.flush()
        proc = subprocess.Popen([sys.executable, "-m", "bnprobe", *args], stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        mode = "resume" if state.extra else ("restart" if state.clean else "fresh")
        attempt = {"started": _now(), "mode": mode, "threads": self.threads}
        self.state["steps"][step.name]["attempts"].append(attempt)
        self.running[step.name] = (proc, handle, time.perf_counter(), attempt)
        self._set(step.name, "running")
        what = step.command + (f", {state.detail}" if state.detail else "")
        self._progress("start", step.name, f"({what})")

    def _finish(self, step: Step, returncode: int, cpu: float | None = None) -> bool:
        proc, handle, t0, attempt = self.running.pop(step.name)
        handle.close()
        seconds = time.perf_counter() - t0
        attempt.update(seconds=round(seconds, 2), returncode=returncode)
        if cpu is not None:
            attempt["cpu_seconds"] = round(cpu, 2)
        if returncode == 0 and not step_state(step, self.root).done:
            returncode = -1000
            attempt["error"] = "exited 0 without writing its output marker"
        self.finished += 1
        if returncode == 0:
            self._set(step.name, "done")
            self._progress("done", step.name, f"{seconds:.1f}s" + (f" ({cpu:.0f}s CPU)" if cpu else ""))
            return True
        self.failed.append(step.name)
        self._set(step.name, "failed")
        why = attempt.get("error") or _last_line(self.root / LOGS / f"{step.name}.log")
        log = self.root / LOGS / f"{step.name}.log"
        self._progress("FAILED", step.name, f"exit {returncode}: {why}  (log: {log})")
        for dep in self.plan.dependents(step.name):
            if dep not in self.skipped:
                self.skipped.append(dep)
                self.state["steps"][dep]["status"] = "skipped"
        self._save()
        return False

    def _stop_all(self) -> None:
        """Terminate running steps (SIGTERM, then SIGKILL after a grace period)."""
        for proc, _h, _t, _a in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE
        for name, (proc, handle, t0, attempt) in list(self.running.items()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            handle.close()
            attempt.update(seconds=round(time.perf_counter() - t0, 2), returncode=proc.returncode,
                           error="interrupted")
            self.state["steps"][name]["status"] = "interrupted"
        self.running.clear()

    # ------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Run every unfinished step; return the state. Raises BnprobeError if a step failed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _lock(self.root):
            (self.root / LOGS).mkdir(exist_ok=True)
            atomic_write_text(self.root / STUDY_COPY, self.study.path.read_text(encoding="utf-8"))
            self._init_state()
            todo = 0
            for step in order(self.study):
                if step_state(step, self.root).done:
                    self.state["steps"][step.name]["status"] = "done"
                else:
                    todo += 1
            self._save()
            total = len(self.study.steps)
            self.finished = total - todo
            self.log(f"[study] {self.study.name}: {total} steps, {total - todo} already done, {todo} to run; "
                     f"--jobs {self.jobs}, {self.threads} thread{'s' if self.threads > 1 else ''} each; "
                     f"logs in {self.root / LOGS}")
            t0 = time.perf_counter()
            try:
                with _sigterm_raises():
                    self._loop()
            except (KeyboardInterrupt, _Terminated):
                self._stop_all()
                self.state["status"] = "interrupted"
                self._save()
                self.log(f"[study] interrupted; rerun with --resume to continue in {self.root}")
                raise KeyboardInterrupt from None
            self.state["status"] = "failed" if self.failed else "finished"
            wall = time.perf_counter() - t0
            cpu = sum(a.get("cpu_seconds", 0.0) for s in self.state["steps"].values() for a in s["attempts"]
                      if a.get("started", "") >= self.state["sessions"][-1]["started"])
            self.state["sessions"][-1].update(wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1))
            self._save()
            self.log(f"[study] {todo} step{'s' if todo != 1 else ''} in {wall / 60:.1f} min wall, "
                     f"{cpu / 60:.1f} min CPU")
        if self.failed:
            raise BnprobeError(
                f"{len(self.failed)} step(s) failed: {', '.join(self.failed)}"
                + (f" ({len(self.skipped)} skipped after them)" if self.skipped else "")
                + f"; see {self.root / LOGS}/<step>.log, then rerun with --resume")
        return self.state

    def _loop(self) -> None:
        while True:
            while len(self.running) < self.jobs and (step := self.plan.pop()) is not None:
                if step.name in self.skipped:
                    continue  # a dependency failed
                state = step_state(step, self.root)
                if state.done:
                    self.plan.done(step)
                    continue
                self._start(step, state)
            if not self.running:
                return
            time.sleep(POLL)
            for name in list(self.running):
                code, cpu = _poll(self.running[name][0])
                if code is not None:
                    step = self.study.steps[name]
                    if self._finish(step, code, cpu):
                        self.plan.done(step)


def _poll(proc: subprocess.Popen) -> tuple[int | None, float | None]:
    """The exit status of a step's process (None: running) and its CPU seconds where known."""
    if not hasattr(os, "wait4"):  # pragma: no cover - not POSIX
        return proc.poll(), None
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped already
        return proc.poll(), None
    if pid == 0:
        return None, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _last_line(log: Path) -> str:
    """The last non-empty line of a step's log (its ``Error:`` line when it failed)."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("===")]
    return lines[-1][:300] if lines else ""


def dry_run(study: Study, root: str | Path) -> list[str]:
    """The plain bnprobe commands of every step, in dependency order; nothing is run or written."""
    return [command_line(step, root, study.steps) for step in order(study)]
