"""Re-rank the search's best plans with the final recipe before choosing one (multi-fidelity).

The search scores plans with a short training on one fold: cheap, but a noisy proxy for what
the final training will make of a plan (``benchmarks/search_cost/README.md``: short evaluations
over-rate plans that train the new head at a high rate). So the few best distinct plans of the
last generation (all scored on one fold, so their order is fair) are trained with the final
recipe on the whole training split, seed ``final_seeds[0]``, and the plan with the best
validation score wins. The winning run is that seed's final run, so the winner is not trained
twice. This is the same selection the baselines get from their learning-rate grid: a few
full-recipe runs compared on validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from biotune.core.plan import FineTunePlan, decode_genome

RERANK = "rerank.jsonl"


def candidates(
    population: Sequence[tuple[Any, float]], names: Sequence[str], k: int
) -> list[tuple[Any, float, FineTunePlan]]:
    """The first ``k`` distinct plans of a generation (best first): (candidate, fitness, plan)."""
    out: list[tuple[Any, float, FineTunePlan]] = []
    seen: set[tuple] = set()
    for candidate, fitness in population:
        plan = decode_genome(candidate.genes, names)
        if not plan.trained or plan.key() in seen:
            continue
        seen.add(plan.key())
        out.append((candidate, fitness, plan))
        if len(out) == k:
            break
    return out


def choose(records: Sequence[dict[str, Any]], metric: str = "val_balanced") -> dict[str, Any]:
    """The record with the best validation score; ties go to the better search rank."""
    return max(records, key=lambda r: (r[metric], -r["rank"]))
