"""The ``bnprobe`` command group. Subcommands import the library lazily."""

from __future__ import annotations

import click

from .._version import __version__
from ._common import run_guarded


class _Group(click.Group):
    """A click group that turns user errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context):
        return run_guarded(ctx, lambda: super(_Group, self).invoke(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="bnprobe")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Measure and model the randomness of Batch Normalization.

    Start with `bnprobe quickstart`.
    """
    ctx.ensure_object(dict)["debug"] = debug


# One module per command, each exposing ``command``; they import the library lazily.
_COMMANDS = ["quickstart", "train", "retrain", "measure", "recalibrate", "fit", "plot", "evaluate", "report"]
_COMMANDS += ["study"]  # bnprobe/cli/study.py


def _register() -> None:
    import importlib

    for name in _COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue  # command not part of this build yet
        cli.add_command(module.command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="bnprobe")
