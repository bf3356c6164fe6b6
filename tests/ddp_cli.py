"""Run several ``bnprobe`` commands in one torchrun job (the tests start fewer jobs).

Usage: ``torchrun ... tests/ddp_cli.py PLAN.json``. The plan is a list of
``{"argv": [...], "interrupt_after": N}`` (``interrupt_after`` optional: the command's N-th
``measure`` draw in each process raises KeyboardInterrupt, as Ctrl-C would). Each command
runs as ``python -m bnprobe ARGV`` would, except that the process group stays joined until
the last one (``bnprobe`` leaves it after each command). The processes start each command
together, each writing ``[ddp_cli] command I`` to stdout and stderr (see :func:`split`), and
end it with ``[ddp_cli] command I rank R exit C`` on stderr.
"""

import json
import os
import re
import sys

import bnprobe.cli._common as common
from bnprobe.cli.main import cli
from bnprobe.distributed import barrier, shutdown
from bnprobe.measure.recorder import Recorder


def _interrupting(after: int):
    original, calls = Recorder.run, [0]

    def run(self, model, x):
        calls[0] += 1
        if calls[0] == after:
            raise KeyboardInterrupt
        return original(self, model, x)

    return run


def _line(stream, text: str) -> None:
    """Write one marker line in a single write: ``print`` writes the text and the newline
    separately on an unbuffered stream (PYTHONUNBUFFERED=1), and the other process's lines
    then land inside the marker line, where :func:`split` drops them."""
    stream.write(text + "\n")
    stream.flush()


def split(text: str, commands: int) -> list[str]:
    """The lines of a stream of the job, by command (``[ddp_cli]`` lines left out)."""
    parts = [[] for _ in range(commands)]
    current = None
    for line in text.splitlines():
        marker = re.match(r"\[ddp_cli\] command (\d+)", line)
        if marker:
            current = int(marker.group(1))
        elif current is not None:
            parts[current].append(line)
    return ["\n".join(p) for p in parts]


def exit_codes(stderr: str) -> dict[tuple[int, int], int]:
    """(command, rank) -> exit status."""
    return {(int(c), int(r)): int(e) for c, r, e in
            re.findall(r"\[ddp_cli\] command (\d+) rank (\d+) exit (-?\d+)", stderr)}


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    leave, original_run = common._leave_process_group, Recorder.run
    common._leave_process_group = lambda: None
    rank = os.environ.get("RANK", "0")
    for i, step in enumerate(plan):
        barrier()  # the previous command ended everywhere: its output is complete
        for stream in (sys.stdout, sys.stderr):
            _line(stream, f"[ddp_cli] command {i}")
        if step.get("interrupt_after"):
            Recorder.run = _interrupting(step["interrupt_after"])
        try:
            cli.main(args=[str(a) for a in step["argv"]], prog_name="bnprobe", standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            Recorder.run = original_run
        sys.stdout.flush()
        _line(sys.stderr, f"[ddp_cli] command {i} rank {rank} exit {code}")
    barrier()
    common._leave_process_group = leave
    shutdown()


if __name__ == "__main__":
    main()
