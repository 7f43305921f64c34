"""The end of the loop: the plan the search recommends (the best of its last generation, or the
re-ranking's winner), written to ``best_plan.json``, and what the search cost
(``search_summary.json``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from biotune.core import cost as costs
from biotune.core.evolution import BioTuneEvolution, Candidate
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.runner import promote, rerank
from biotune.runner.config import PartitionPrint, PlanOrigin
from biotune.runner.fitness import Evaluator
from biotune.runner.rundir import BEST_PLAN, SEARCH_SUMMARY

if TYPE_CHECKING:
    from biotune.runner.search import Search

_log = logging.getLogger("biotune.search")


@dataclass
class Chosen:
    """The recommended plan, its candidate and search fitness, and the re-ranking's records."""

    candidate: Candidate
    fitness: float
    plan: FineTunePlan
    reranked: list[dict[str, Any]]


def choose(
    search: Search, evo: BioTuneEvolution, evaluator: Evaluator, partition: dict[str, Any]
) -> Chosen:
    """The best of the last generation, or with ``rerank`` the best of its k best distinct
    plans after the final recipe; written to ``best_plan.json`` with where it came from."""
    assert search.bench is not None
    best, best_fitness = evo.best
    reranked, picks = (
        rerank.rerank_plans(search, evo, evaluator) if search.config.rerank > 1 else ([], [])
    )
    if reranked:
        chosen = rerank.choose(reranked)
        best, best_fitness = next((c, f) for c, f, _ in picks if c.id == chosen["candidate"])
    plan = decode_genome(best.genes, search.bench.partition.names)
    search.run.write(
        BEST_PLAN,
        {
            **plan.to_dict(),
            "fitness": best_fitness,
            "candidate": best.id,
            "genes": [float(g) for g in best.genes],
            "origin": _origin(search, partition),
        },
    )
    return Chosen(best, best_fitness, plan, reranked)


def write_summary(
    search: Search, chosen: Chosen, evaluations: list[dict[str, Any]], evaluator: Evaluator
) -> dict[str, Any]:
    """The search's cost (``core.cost.search_cost``, re-ranking included), written with the
    chosen plan to ``search_summary.json``."""
    wall = sum(float(s.get("seconds", 0.0)) for s in search._sessions)
    cost = costs.search_cost(evaluations, evaluator.ft_work, wall_seconds=wall)
    cost["cache"] = evaluator.cache_status
    if evaluator.cache is not None:  # this process's cache (workers keep their own); logged,
        # not stored: a resumed search rebuilds its cache, and its summary must equal the
        # uninterrupted one's
        _log.info("%s", evaluator.cache.summary())
    cost["ft_epochs"] = search.config.protocol.train.epochs  # the unit's epoch budget
    if chosen.reranked:
        work = sum(r["work"] for r in chosen.reranked)
        cost["rerank"] = {
            "plans": len(chosen.reranked),
            "work_flops": work,
            "seconds": sum(r["seconds"] for r in chosen.reranked),
        }
        cost["work_flops"] += work
        cost["ft_equivalents"] = cost["work_flops"] / cost["ft_work_flops"]
    promoted = promote.promoted_runs(search) if search.config.promote else []
    if promoted:
        work = sum(r["work"] for r in promoted)
        cost["promote"] = {
            "plans": len(promoted),
            "work_flops": work,
            "seconds": sum(r["seconds"] for r in promoted),
        }
        cost["work_flops"] += work
        cost["ft_equivalents"] = cost["work_flops"] / cost["ft_work_flops"]
    search.run.write(
        SEARCH_SUMMARY,
        {"cost": cost, "best_fitness": chosen.fitness, "best_plan": chosen.plan.to_dict()},
    )
    return cost


def _origin(search: Search, partition: dict[str, Any]) -> dict[str, Any]:
    """Where a plan came from (``PlanOrigin``), so ``biotune train --plan`` can reuse it and
    refuse a plan made for other blocks."""
    blocks = PartitionPrint(tuple(b["name"] for b in partition["blocks"]), partition["fingerprint"])
    return PlanOrigin(search.config.data, search.config.final.base_lr, blocks).to_dict()
