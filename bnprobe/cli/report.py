"""``bnprobe report``: the paper's Table 1 from several evaluated runs."""

from __future__ import annotations

import click

from ._common import echo


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", default="report.md", show_default=True, help="Markdown file (a .csv is written beside it)."
)
@click.option("--force", is_flag=True, help="Overwrite --out.")
def command(runs: tuple[str, ...], out: str, force: bool) -> None:
    """Table of method, accuracy, NLL (single pass, MC-10, MC-30), ECE, AURC for RUN_DIRs.

    Each RUN_DIR must have been evaluated (RUN_DIR/evaluation/metrics.json), or be the
    evaluation folder itself.
    """
    from ..evaluation.report import write_report

    table = write_report(runs, out, force=force)
    echo(table)
    echo(f"wrote {out} and {out.rsplit('.', 1)[0]}.csv")
