"""Budgets on what fine-tuning costs, and the cost axis of the Pareto objective (not in the paper).

A plan's value is not only its accuracy: training fewer blocks needs less memory, runs faster
and stores a smaller delta per task. ``BudgetConfig`` caps the share of parameters trained
and the peak memory of a training step, and chooses the cost the ``pareto`` objective trades
accuracy against. ``SearchBudget`` turns it into the two functions of a genome the evolution
takes (``fits`` and ``cost``; the evolution stays numpy only), the cost entry of each
evaluation record, and the runner's guard: a plan over budget is never trained, only recorded
as over budget. The costs themselves are measured on the model by ``measure.PlanCosts``;
this module only asks them (``CostTable``), so it stays numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from biotune.core.fields import checked_fields, option
from biotune.core.plan import decode_genome
from biotune.core.records import WORST_FITNESS, Evaluation, Status
from biotune.errors import BioTuneError

PARETO_COSTS = ("params", "memory")
#: The record key of each Pareto cost axis, and how a report labels it.
COST_KEYS = {"params": "trainable_share", "memory": "memory_mb"}
COST_LABELS = {
    "params": "trainable parameters (% of the model)",
    "memory": "peak training memory (MB, float32)",
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class BudgetConfig:
    """Budgets and the trade-off's settings; the defaults change nothing.

    ``max_trainable``: the largest share of the model's parameters a plan may train, in (0, 1]
    (0.1 is 10 %). ``max_memory_mb``: the most memory one float32 training step may hold at
    the final recipe's batch size and optimizer (``measure.training_memory``). ``pareto_cost``:
    what the ``pareto`` objective trades validation accuracy against, "params" (the trainable
    share) or "memory". ``pareto_final``: how many plans spread along the front get the final
    training and a test score at the end (None: all of them).
    """

    max_trainable: float | None = option(
        None,
        flag="--max-trainable",
        type="share",
        metavar="P%",
        none="no limit",
        help="never train a plan that fine-tunes more than P% of the model's parameters "
        "(10% or 10); the search only proposes plans within it",
    )
    max_memory_mb: float | None = option(
        None,
        flag="--max-memory",
        type="megabytes",
        metavar="MB",
        none="no limit",
        help="never train a plan whose float32 training step, at the final training's batch "
        "size and optimizer, holds more than MB of memory (measured once per set of trained "
        "blocks)",
    )
    pareto_cost: str = option(
        "params",
        flag="--pareto-cost",
        choices=PARETO_COSTS,
        help="the cost the pareto objective trades accuracy against: params, the share of "
        "parameters trained, or memory",
    )
    pareto_final: int | None = option(
        None,
        flag="--pareto-final",
        type="positive_int",
        metavar="N",
        none="every plan on it",
        help="train and test N plans spread along the front at the end",
    )

    def __post_init__(self) -> None:
        share = self.max_trainable
        if share is not None and (not _is_number(share) or not 0 < share <= 1):
            raise BioTuneError(
                f"max_trainable must be a share of the parameters in (0, 1], 0.1 for 10% "
                f"(got {share!r})"
            )
        memory = self.max_memory_mb
        if memory is not None and (
            not _is_number(memory) or not memory > 0 or not math.isfinite(memory)
        ):
            raise BioTuneError(f"max_memory_mb must be a positive number of MB (got {memory!r})")
        if self.pareto_cost not in PARETO_COSTS:
            raise BioTuneError(
                f"pareto_cost must be one of {', '.join(PARETO_COSTS)} (got {self.pareto_cost!r})"
            )
        n = self.pareto_final
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise BioTuneError(f"pareto_final must be None or an integer >= 1 (got {n!r})")

    @property
    def limited(self) -> bool:
        """Whether any budget is set."""
        return self.max_trainable is not None or self.max_memory_mb is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "budget") -> BudgetConfig:
        """From ``config.json``, types checked; a configuration stored before budgets existed
        has none."""
        return cls(**checked_fields(cls, {} if data is None else data, where))

    def describe(self) -> str:
        parts = []
        if self.max_trainable is not None:
            parts.append(f"at most {100 * self.max_trainable:g}% of the parameters trained")
        if self.max_memory_mb is not None:
            parts.append(f"at most {self.max_memory_mb:g} MB of training memory")
        return " and ".join(parts) or "no budget"


class CostTable(Protocol):
    """What a budget asks of a plan's costs (``biotune.measure.PlanCosts`` answers it)."""

    @property
    def partition(self) -> Any: ...  # the model's blocks: ``names`` and ``len()``

    def mask(self, plan_or_genes: Any) -> tuple[bool, ...]: ...

    def trainable_params(self, mask: tuple[bool, ...]) -> int: ...

    def trainable_share(self, mask: tuple[bool, ...]) -> float: ...

    def memory_mb(self, mask: tuple[bool, ...]) -> float: ...

    def record(self, plan_or_genes: Any) -> dict[str, Any]: ...


class SearchBudget:
    """A search's budget and cost axis over one model's plan costs."""

    def __init__(self, config: BudgetConfig, costs: CostTable, objective: str = "accuracy"):
        self.config = config
        self.costs = costs
        self.objective = objective

    def fits_mask(self, mask: tuple[bool, ...]) -> bool:
        """Whether a trained set fits every budget (a plan that trains nothing always fits: it
        is invalid, and refused as such). The parameter check goes first: it is free."""
        if not any(mask):
            return True
        share = self.config.max_trainable
        if share is not None and self.costs.trainable_share(mask) > share * (1 + 1e-12):
            return False
        memory = self.config.max_memory_mb
        return memory is None or self.costs.memory_mb(mask) <= memory

    def fits(self, genes: np.ndarray) -> bool:
        return self.fits_mask(self.costs.mask(genes))

    def cost(self, genes: np.ndarray) -> float:
        """The Pareto objective's cost of a genome: its trainable share or its memory in MB."""
        mask = self.costs.mask(genes)
        if self.config.pareto_cost == "memory":
            return self.costs.memory_mb(mask) if any(mask) else 0.0
        return self.costs.trainable_share(mask)

    def evolution_hooks(self) -> dict[str, Any]:
        """``fits`` and ``cost`` for ``BioTuneEvolution`` (None where not needed)."""
        return {
            "fits": self.fits if self.config.limited else None,
            "cost": self.cost if self.objective == "pareto" else None,
        }

    def check_feasible(self) -> None:
        """Refuse a budget no plan fits: not even the cheapest one-block plan, cheapest by the
        budget itself (the block with the fewest parameters may need the most memory: the
        early blocks' activations are the largest)."""
        if not self.config.limited:
            return
        n = len(self.costs.partition)
        singles = [tuple(i == b for i in range(n)) for b in range(n)]
        if any(self.fits_mask(m) for m in singles):
            return
        cheapest = min(singles, key=self._overrun)
        name = self.costs.partition.names[cheapest.index(True)]
        what = [f"{100 * self.costs.trainable_share(cheapest):.3g}% of the parameters"]
        if self.config.max_memory_mb is not None:
            what.append(f"{self.costs.memory_mb(cheapest):.4g} MB of training memory")
        raise BioTuneError(
            f"no plan fits the budget ({self.config.describe()}): the cheapest, training only "
            f"'{name}', needs {' and '.join(what)}"
        )

    def _overrun(self, mask: tuple[bool, ...]) -> float:
        """How far a trained set is over its budgets: the largest ratio of cost to limit."""
        ratios = []
        if self.config.max_trainable is not None:
            ratios.append(self.costs.trainable_share(mask) / self.config.max_trainable)
        if self.config.max_memory_mb is not None:
            ratios.append(self.costs.memory_mb(mask) / self.config.max_memory_mb)
        return max(ratios)

    def record(self, genes: Any) -> dict[str, Any]:
        """The cost entry of an evaluation record (``PlanCosts.record``)."""
        return self.costs.record(genes)

    def over_budget(self, candidate: Any, evaluator: Any) -> Any:
        """The record of a candidate over budget, never trained (worst fitness, status
        "over_budget"), or None if it fits. The evolution proposes none; this is the guard."""
        genes = np.asarray(candidate.genes, dtype=float)
        if self.fits(genes):
            return None
        plan = decode_genome(genes, evaluator.partition.names)
        return Evaluation(
            candidate.id,
            candidate.generation,
            candidate.role,
            genes.tolist(),
            plan.to_dict(),
            evaluator.fold_of(candidate.generation),
            list(evaluator.protocol.seeds),
            [],
            WORST_FITNESS,
            Status.OVER_BUDGET,
            0.0,
            0,
            0,
            [],
        )
