"""``bnprobe study``: a study file's runs as plain bnprobe commands, in dependency order, and one report.

Modules: :mod:`.spec` (parse and validate the TOML into steps), :mod:`.plan` (dependency
order), :mod:`.runner` (processes, --jobs, --resume, study.json), :mod:`.report` and
:mod:`.figures` (mean and spread over seeds, figures).
"""

from .plan import order
from .runner import Runner, dry_run, step_state
from .spec import Step, Study, load_study

__all__ = ["Runner", "Step", "Study", "dry_run", "load_study", "order", "step_state"]
