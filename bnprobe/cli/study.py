"""``bnprobe study``: run a study file's train/measure/retrain/evaluate steps and report them."""

from __future__ import annotations

import click

from ._common import echo


@click.command("study")
@click.argument("study_file", metavar="STUDY.toml", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Study folder: runs/, logs/, study.json, report.md, figures/.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steps run at once, as separate processes; the CPU cores are split between them "
                   "(OMP_NUM_THREADS = cores // jobs).")
@click.option("--resume", is_flag=True,
              help="Continue the study in --out: finished steps are skipped, interrupted ones resume.")
@click.option("--dry-run", is_flag=True,
              help="Print the plain bnprobe commands in dependency order; run and write nothing.")
def command(study_file: str, out: str, jobs: int, resume: bool, dry_run: bool) -> None:
    """Run the study in STUDY.toml into --out and write --out/report.md, report.csv and figures.

    Each step is one plain 'bnprobe train|measure|retrain|evaluate' command, run as its own
    process once the steps it needs have finished. The study file is checked before anything
    runs. Without --resume, --out must not exist or be empty. Progress goes to stderr, each
    step's output to --out/logs/STEP.log.
    """
    from ..study.report import write_report
    from ..study.runner import Runner
    from ..study.runner import dry_run as plan_commands
    from ..study.spec import load_study

    study = load_study(study_file)
    if dry_run:
        for line in plan_commands(study, out):
            echo(line)
        return
    runner = Runner(study, out, jobs=jobs, resume=resume,
                    log=lambda message: click.echo(message, err=True))
    runner.run()
    click.echo("[study] all steps done; writing the report", err=True)
    written = write_report(study, out)
    echo(written.markdown)
    echo(f"wrote {', '.join(str(p) for p in written.files)}")
