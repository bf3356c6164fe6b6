"""The dependency graph of a study's steps, with the standard library's ``graphlib``.

``graphlib.TopologicalSorter`` finds cycles and hands out the steps whose dependencies are
done; among the ready steps the one that most other steps wait for (directly or not) goes
first, then the one written first in the study file, so the order is deterministic and the
steps that unlock others (a BN run, its measurement) are not queued behind evaluations.
"""

from __future__ import annotations

import graphlib
import heapq
from typing import Iterable

from ..errors import BnprobeError
from .spec import Step, Study


class Plan:
    """Steps in dependency order; ``pop()`` / ``done()`` drive a scheduler.

    Args:
        study: The validated study.

    Raises:
        BnprobeError: for a dependency cycle (naming it) or a dependency that is not a step.
    """

    def __init__(self, study: Study) -> None:
        self.steps = study.steps
        self.sorter: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
        for step in self.steps.values():
            for dep in step.deps:
                if dep not in self.steps:
                    raise BnprobeError(f"step {step.name!r} depends on {dep!r}, which is not a step "
                                       "(missing dependency)")
            self.sorter.add(step.name, *step.deps)
        try:
            self.sorter.prepare()
        except graphlib.CycleError as exc:
            cycle = list(exc.args[1])
            runs = list(dict.fromkeys(self.steps[n].method for n in cycle))
            raise BnprobeError(f"dependency cycle between runs {' -> '.join(runs + runs[:1])} "
                               f"(steps {' -> '.join(cycle)})") from None
        self._children: dict[str, list[str]] = {name: [] for name in self.steps}
        for step in self.steps.values():
            for dep in step.deps:
                self._children[dep].append(step.name)
        self._priority = {name: (-len(self.dependents(name)), step.index)
                          for name, step in self.steps.items()}
        self._heap: list[tuple[tuple[int, int], str]] = []
        self._push(self.sorter.get_ready())

    def _push(self, names: Iterable[str]) -> None:
        for name in names:
            heapq.heappush(self._heap, (self._priority[name], name))

    def pop(self) -> Step | None:
        """The first ready step, or None."""
        return self.steps[heapq.heappop(self._heap)[1]] if self._heap else None

    def done(self, step: Step) -> None:
        """Mark a step finished; its dependents may become ready."""
        self.sorter.done(step.name)
        self._push(self.sorter.get_ready())

    def dependents(self, name: str) -> list[str]:
        """Every step that needs ``name``, directly or not."""
        found: dict[str, None] = {}
        frontier = [name]
        while frontier:
            for child in self._children[frontier.pop()]:
                if child not in found:
                    found[child] = None
                    frontier.append(child)
        return list(found)


def order(study: Study) -> list[Step]:
    """Every step in a dependency order (the one ``--dry-run`` prints and ``--jobs 1`` runs)."""
    plan = Plan(study)
    out = []
    while (step := plan.pop()) is not None:
        out.append(step)
        plan.done(step)
    return out
