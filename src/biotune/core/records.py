"""The typed records of a run: what one evaluation and one final training found.

A run directory stores them as JSON lines (``evaluations.jsonl``, ``final_runs.jsonl``; the
layout is ``biotune.runner.rundir``'s). Statuses and roles are string enums whose values are
the strings stored, so a record written from these types is byte for byte the JSON it always
was, and a record read back compares equal to the enum members.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class _StrEnum(str, Enum):
    """A string enum that prints and formats as its value (``enum.StrEnum`` of Python 3.11)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Status(_StrEnum):
    """How an evaluation, or a training run, ended."""

    OK = "ok"
    INVALID = "invalid"  # the genome selects no block: nothing to train
    DIVERGED = "diverged"  # the loss became NaN or infinite
    PRUNED = "pruned"  # stopped early: clearly worse than this generation's elites
    OVER_BUDGET = "over_budget"  # the plan costs more than the budget allows: never trained


class Role(_StrEnum):
    """Why the evolution asked for a candidate."""

    INITIAL = "initial"  # a member of the initial population
    ELITE = "elite"  # an elite, re-evaluated on the new generation's fold
    LOCAL = "local"  # one of an elite's two local-search variants
    CHILD = "child"  # crossover, mutation and adoption of three pool members
    IMMIGRANT = "immigrant"  # a random newcomer (the mating pool is too small to breed)


WORST_FITNESS = 1.0
#: Fields of an ``Evaluation`` that measure where and when it ran, not what it found: they may
#: differ between executors, worker counts and resumed runs; every other field may not.
MEASURED_FIELDS = ("seconds", "cache_work", "cache_images")
#: What every stored evaluation record holds (a run is resumed from them).
EVALUATION_KEYS = (
    "candidate",
    "generation",
    "role",
    "genes",
    "plan",
    "fold",
    "seeds",
    "scores",
    "fitness",
    "status",
    "seconds",
    "train_images",
    "eval_images",
    "epochs",
)


@dataclass
class Evaluation:
    """One record of the run: a genome scored on one fold over the protocol's seeds."""

    candidate: int
    generation: int
    role: str  # a ``Role`` value ("" for a genome scored outside a search)
    genes: list[float]
    plan: dict[str, Any]
    fold: int
    seeds: list[int]
    scores: list[float]  # validation metric per seed
    fitness: float
    status: Status
    seconds: float
    train_images: int
    eval_images: int
    epochs: list[int]
    curves: list[list[float]] = field(default_factory=list)  # validation metric per epoch, per seed
    reused_from: int | None = None  # memoised: the candidate whose identical evaluation this copies
    work: float = 0.0  # training + validation work in forward FLOPs (core.cost), cache excluded
    cached_prefix: int = 0  # leading blocks served from the feature cache (0: not cached)
    pruned_at: int | None = None  # epochs the pruned seed ran before early termination
    # Building cache entries: it falls to whichever evaluation first needs an entry in its worker,
    # so like ``seconds`` these two depend on the executor; nothing else in a record does.
    cache_work: float = 0.0
    cache_images: int = 0

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: plain JSON values, statuses and roles as their strings."""
        return {**asdict(self), "role": str(self.role), "status": self.status.value}


@dataclass(frozen=True)
class FinalRun:
    """One final training of a plan with one seed on the whole training split, tested once.

    Test scores are None without a test split. Stored as a line of ``final_runs.jsonl``.
    """

    seed: int
    test_top1: float | None
    test_balanced: float | None
    val_top1: float
    val_balanced: float
    best_epoch: int
    epochs_run: int
    seconds: float
    train_images: int
    eval_images: int
    cached_prefix: int  # leading frozen blocks trained on from the feature cache
    status: Status
    trainable_params: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))

    def to_dict(self) -> dict[str, Any]:
        """The record as stored, in field order."""
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinalRun:
        """A stored record; one written before ``cached_prefix`` existed trained uncached."""
        data = {"cached_prefix": 0, **data}
        return cls(**{f.name: data[f.name] for f in fields(cls)})
