"""Shared CLI pieces: options defined once, comma lists, error handling."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

import click

from ..errors import BnprobeError, SharedError


class CommaList(click.ParamType):
    """A comma-separated list such as ``8,32,128``, converted element-wise.

    Args:
        kind: Element type (``int`` or ``float``).
        minimum: Smallest allowed element (inclusive), or None.
    """

    name = "list"

    def __init__(self, kind: type = int, minimum: float | None = None) -> None:
        self.kind = kind
        self.minimum = minimum

    def convert(self, value: Any, param: Any, ctx: Any) -> list:
        if isinstance(value, (list, tuple)):
            return list(value)
        parts = [p.strip() for p in str(value).split(",")]
        if not value or any(p == "" for p in parts):
            self.fail(f"{value!r} is not a comma-separated list (e.g. 8,32,128)", param, ctx)
        try:
            items = [self.kind(p) for p in parts]
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(self.kind, f"a {self.kind.__name__}")
            bad = next(p for p in parts if not _parses(self.kind, p))
            self.fail(f"{value!r}: {bad!r} is not {what} (every element must be {what})", param, ctx)
        if self.minimum is not None:
            bad = [x for x in items if x < self.minimum]
            if bad:
                self.fail(f"{value!r}: elements must be at least {self.minimum} (got {bad[0]})",
                          param, ctx)
        return items


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def seed_option(f: Callable) -> Callable:
    """``--seed``: the seed every generator of the command is built from."""
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Seed of the run's random generators.")(f)


def device_option(f: Callable) -> Callable:
    """``--device auto|cpu|cuda``."""
    return click.option("--device", default="auto", show_default=True,
                        help="auto, cpu, cuda or cuda:N.")(f)


def out_option(default: str, help_text: str) -> Callable:
    """``--out`` with a command-specific default."""
    return click.option("--out", default=default, show_default=True, help=help_text)


def quiet_option(f: Callable) -> Callable:
    """``--quiet``: no progress bars or per-epoch lines."""
    return click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")(f)


def unsafe_load_option(f: Callable) -> Callable:
    """``--unsafe-load``: allow unpickling arbitrary objects from a checkpoint."""
    return click.option("--unsafe-load", is_flag=True,
                        help="Allow checkpoints holding pickled Python objects (trusted files only).")(f)


def _parse_kwargs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict; values parsed as JSON when they are JSON."""
    import json

    out: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def checkpoint_data_options(f: Callable) -> Callable:
    """Options to load a checkpoint and its data (dataset, data root, arch, device, ...)."""
    for option in reversed([
        click.option("--dataset", default=None, help="Override the checkpoint's dataset."),
        click.option("--data-root", default=None, help="Override the dataset folder."),
        click.option("--arch", default=None,
                     help="Architecture of a plain state_dict, e.g. torchvision:resnet18."),
        click.option("--num-classes", type=int, default=None, help="Classes of a plain state_dict."),
        click.option("--width", type=float, default=None,
                     help="All-CNN width of a plain state_dict (like train --width)."),
        click.option("--arch-kwarg", "arch_kwargs", multiple=True, callback=_parse_kwargs,
                     metavar="KEY=VALUE", help="Another architecture argument of a plain state_dict "
                                               "(repeatable; VALUE is read as JSON, else as text)."),
        unsafe_load_option, seed_option, device_option,
    ]):
        f = option(f)
    return f


def echo(message: str = "") -> None:
    """Print a line to stdout."""
    click.echo(message)


def _leave_process_group() -> None:
    """Leave the torchrun process group, if a command joined one (torch is not imported here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reported_by_process_zero(exc: BaseException) -> bool:
    """Whether another torchrun process prints this error: one every process raises alike.

    A usage error depends only on the command line, the same in every process; a
    :class:`SharedError` was raised on every process at once. Process 0 (``RANK`` 0 or
    unset) prints both; the others exit quietly with the same status.
    """
    return isinstance(exc, (SharedError, click.UsageError)) and os.environ.get("RANK", "0") != "0"


def run_guarded(ctx: click.Context, call: Callable[[], Any]) -> Any:
    """Run a command body: user errors become one line and exit 2 (traceback with --debug)."""
    def debug() -> bool:  # read late: the group callback sets it during the call
        return bool((ctx.find_root().obj or {}).get("debug"))

    try:
        return call()
    except BnprobeError as exc:
        if _reported_by_process_zero(exc):
            sys.exit(2)
        if debug():
            traceback.print_exc()
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        if debug():
            raise
        if _reported_by_process_zero(exc):
            sys.exit(2)
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:  # a bug: say so in one line unless debugging
        if debug():
            raise
        click.echo(f"Error: internal error: {type(exc).__name__}: {exc} "
                   "(rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    finally:
        _leave_process_group()
