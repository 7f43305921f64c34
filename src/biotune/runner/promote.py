"""A middle rung between the search and the re-ranking: successive halving's next step.

The search scores many plans cheaply; the re-ranking trains a few with the final recipe. With
``promote = m`` the search's ``m`` best plans (picked as the re-ranking would pick them) first
train on the whole training split for ``promote_epochs`` epochs (no early stop, seed
``final_seeds[0]``: the same data and seed for every plan, so their scores compare), and only the
best ``rerank`` of them go on to the final recipe. Each run is recorded in ``promote.jsonl`` the
moment it ends, so a resumed search never trains it again; its work counts in the search's cost.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from biotune.core.cost import run_work
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
    assert search.bench is not None
    config = search.config
    train = replace(
        config.final, epochs=config.promote_epochs, patience=config.promote_epochs, augment=False
    )
    seed = config.final_seeds[0]
    done = {r["candidate"]: r for r in search.run.records(PROMOTE, repair=True)}
    for rank, (candidate, fitness, plan) in enumerate(picks):
        if candidate.id in done:
            continue
        _, result, cached = search.bench.train(plan, train, seed, evaluator.device)
        record = {
            "candidate": candidate.id,
            "rank": rank,
            "fitness": fitness,
            "plan": plan.to_dict(),
            "val_balanced": result.val.balanced,
            "val_top1": result.val.top1,
            "epochs_run": result.epochs_run,
            "cached_prefix": cached,
            "seconds": result.seconds,
            "work": run_work(
                evaluator.flops, cached, plan.frozen_prefix, result.train_images, result.eval_images
            ),
        }
        search.run.append(PROMOTE, record)
        done[candidate.id] = record
        _log.info(
            "promoted %d/%d: %s: val balanced accuracy %.4f after %d epochs on the whole split",
            rank + 1,
            len(picks),
            plan.describe(),
            record["val_balanced"],
            config.promote_epochs,
        )
    metric = config.final.metric
    order = sorted(range(len(picks)), key=lambda i: (-done[picks[i][0].id][f"val_{metric}"], i))
    return [picks[i] for i in order[: config.rerank]]


def promoted_runs(search: Search) -> list[dict[str, Any]]:
    """The middle rung's records so far (for the search's cost)."""
    return search.run.records(PROMOTE, repair=True)
