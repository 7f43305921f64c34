"""A middle rung between the search and the re-ranking: successive halving's next step.

The search scores many plans cheaply; the re-ranking trains a few with the final recipe. With
``promote = m`` the search's ``m`` best plans (picked as the re-ranking would pick them) first
train longer on the search's own fold and seeds: ``promote_epochs`` epochs, no early stop, no
pruning (the same data and seeds for every plan, so their scores compare; cached frozen prefixes
are reused). This is the fidelity benchmark's ``long`` proxy (``benchmarks/fidelity``), which
ranks plans like the final recipe far better than the search's 2-epoch evaluation. Only the best
``rerank`` go on to the final recipe. Each run is recorded in ``promote.jsonl`` the moment it
ends, so a resumed search never trains it again; its work counts in the search's cost.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from biotune.core.plan import FineTunePlan
from biotune.runner.fitness import Evaluator
from biotune.runner.rundir import PROMOTE

if TYPE_CHECKING:
    from biotune.runner.search import Search

_log = logging.getLogger("biotune.search")


def narrow(
    search: Search, evaluator: Evaluator, picks: list[tuple[Any, float, FineTunePlan]]
) -> list[tuple[Any, float, FineTunePlan]]:
    """Train ``picks`` at the middle rung; the best ``rerank`` of them, best first (ties: the
    better search rank)."""
    config = search.config
    train = replace(
        config.protocol.train, epochs=config.promote_epochs, patience=config.promote_epochs
    )
    metric = train.metric
    done = {r["candidate"]: r for r in search.run.records(PROMOTE, repair=True)}
    for rank, (candidate, fitness, plan) in enumerate(picks):
        if candidate.id in done:
            continue
        # generation 0's fold: the fold of a fixed-fold search, and one fold for all picks
        ev = evaluator.evaluate(candidate.id, candidate.genes, 0, train_config=train)
        record = {
            "candidate": candidate.id,
            "rank": rank,
            "fitness": fitness,
            "plan": plan.to_dict(),
            "fold": ev.fold,
            "seeds": ev.seeds,
            f"val_{metric}": 1.0 - ev.fitness,
            "status": str(ev.status),
            "epochs_run": max(ev.epochs, default=0),
            "cached_prefix": ev.cached_prefix,
            "seconds": ev.seconds,
            "work": ev.work + ev.cache_work,
        }
        search.run.append(PROMOTE, record)
        done[candidate.id] = record
        _log.info(
            "promoted %d/%d: %s: validation %s %.4f after %d epochs on the search's fold",
            rank + 1,
            len(picks),
            plan.describe(),
            metric,
            record[f"val_{metric}"],
            config.promote_epochs,
        )
    order = sorted(range(len(picks)), key=lambda i: (-done[picks[i][0].id][f"val_{metric}"], i))
    return [picks[i] for i in order[: config.rerank]]


def promoted_runs(search: Search) -> list[dict[str, Any]]:
    """The middle rung's records so far (for the search's cost)."""
    return search.run.records(PROMOTE, repair=True)
