"""Where evaluations run. The evolution stays in the driver; executors only train and score.

Every executor gets the same tasks and returns the same records (an evaluation is a pure
function of genome, fold and seeds), so the search's result does not depend on which one runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from biotune.errors import BioTuneError
from biotune.fitness import Evaluation, Evaluator


@dataclass(frozen=True)
class Task:
    candidate: int
    genes: tuple[float, ...]
    generation: int
    role: str
    reference: tuple[tuple[float, ...], ...] = ()  # elite validation curves (early termination)


class InProcessExecutor:
    """Evaluate one task after another in this process (the default)."""

    name = "inprocess"

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, tasks: Sequence[Task], on_result: Callable[[Evaluation], None]) -> None:
        for t in tasks:
            on_result(
                self.evaluator.evaluate(
                    t.candidate, t.genes, t.generation, t.role, [list(c) for c in t.reference]
                )
            )

    def close(self) -> None:
        pass


def make_executor(
    name: str,
    evaluator: Evaluator,
    evaluator_factory: Callable[[], Evaluator],
    workers: int = 1,
    ray_address: str | None = None,
) -> InProcessExecutor:
    """The executor called ``name``; workers of other processes build their own evaluator."""
    if name == "inprocess":
        return InProcessExecutor(evaluator)
    raise BioTuneError(f"unknown executor {name!r}; choose inprocess")
