"""The end of a Pareto search: its front, each plan trained and tested next to the anchors.

The front is taken from the evaluations scored on the fold of the search's last generation
(``core.pareto.fold_front``): their validation scores come from the same data and seeds, so they
compare; scores of other folds never enter it. The front's plans (or ``pareto_final`` of them,
spread from the cheapest to the most accurate) and the three anchors (full fine-tuning, the top
half of the blocks, linear probing; those within the budget) are then trained with the final
recipe on the whole training split for every final seed and tested once, resumably
(``pareto_runs.jsonl``; the search's best plan reuses its own final runs). Written:
``pareto.json`` (every plan's costs and scores, and which anchors, if any, dominate a front plan
on test), ``pareto.png`` and ``pareto.md`` (drawn by ``reports.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from biotune.core.budget import COST_KEYS
from biotune.core.pareto import dominates, fold_front, plan_key, spread_along
from biotune.core.plan import BlockSetting, FineTunePlan
from biotune.runner.final import final_training_run
from biotune.runner.rundir import BEST_PLAN, PARETO, PARETO_PLOT, PARETO_RUNS, PARETO_TABLE

if TYPE_CHECKING:
    from biotune.runner.search import Search

ANCHORS = ("full fine-tuning", "top half", "linear probing")


def anchor_plans(names: tuple[str, ...]) -> list[tuple[str, FineTunePlan]]:
    """The anchors, named, as the search starts from them (``core.evolution.anchor_genes``): every
    block, the top half of the blocks, the head alone, all at the base learning rate. Plans that
    coincide (a model of one or two blocks) are listed once, under their first name."""
    n = len(names)
    plans = (
        FineTunePlan.full(names),
        FineTunePlan(tuple(BlockSetting(name, i >= n // 2) for i, name in enumerate(names))),
        FineTunePlan.head_only(names),
    )
    out: list[tuple[str, FineTunePlan]] = []
    for name, plan in zip(ANCHORS, plans, strict=True):
        if all(plan.key() != other.key() for _, other in out):
            out.append((name, plan))
    return out


def _stat(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    if not runs or any(r.get(key) is None for r in runs):
        return None
    values = np.array([r[key] for r in runs], dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "test_top1": _stat(runs, "test_top1"),
        "test_balanced": _stat(runs, "test_balanced"),
        "val_balanced": _stat(runs, "val_balanced"),
        "seconds": float(sum(r.get("seconds", 0.0) for r in runs)),
        "seeds": [r["seed"] for r in runs],
    }


class _FinalRuns:
    """Final trainings of the front and the anchors, one record per plan and seed, resumable."""

    def __init__(self, search: Search, best_plan: FineTunePlan) -> None:
        self.search = search
        self.runs: dict[tuple[str, int], dict[str, Any]] = {}
        for rec in search.run.records(PARETO_RUNS, repair=True, required=("plan_key", "seed")):
            self.runs[(rec["plan_key"], rec["seed"])] = rec
        best = plan_key(best_plan.to_dict())
        for seed, run in search.run.final_runs().items():
            self.runs.setdefault((best, seed), {**run.to_dict(), "plan_key": best})

    def train(self, plan: FineTunePlan) -> dict[str, Any]:
        search = self.search
        assert search.bench is not None
        key = plan_key(plan.to_dict())
        for seed in search.config.final_seeds:
            if (key, seed) in self.runs:
                continue
            run = final_training_run(
                search.bench, plan, search.config.final, seed, callbacks=search.callbacks
            )
            rec = {"plan_key": key, **run.to_dict()}
            search.run.append(PARETO_RUNS, rec)
            self.runs[(key, seed)] = rec
        return _summary([self.runs[(key, s)] for s in search.config.final_seeds])


def finish_pareto(search: Search, evaluations: list[dict[str, Any]], final: bool) -> dict[str, Any]:
    """Write ``pareto.json``, ``pareto.png`` and ``pareto.md`` for a finished Pareto search,
    training and testing the front and the anchors first unless ``final`` is False."""
    from biotune import reports

    assert search.bench is not None and search.budget is not None
    config, budget, names = search.config, search.budget, search.bench.partition.names
    axis = config.budget.pareto_cost
    key = COST_KEYS[axis]
    records = [
        r if r.get("cost") else {**r, "cost": budget.record(r["genes"])} for r in evaluations
    ]
    last = max(r["generation"] for r in records)
    fold = next(r["fold"] for r in records if r["generation"] == last)
    front = fold_front(records, fold, key)
    chosen = {
        id(front[i])
        for i in spread_along([r["cost"][key] for r in front], config.budget.pareto_final)
    }
    best = FineTunePlan.from_dict(search.run.read(BEST_PLAN) or front[-1]["plan"])
    runs = _FinalRuns(search, best) if final else None
    on_front = {r["candidate"] for r in front}

    front_entries = []
    for rec in front:
        plan = FineTunePlan.from_dict(rec["plan"])
        front_entries.append(
            {
                "candidate": rec["candidate"],
                "generation": rec["generation"],
                "fold": fold,
                "plan": rec["plan"],
                "plan_text": plan.describe(),
                "fitness": rec["fitness"],
                "val_score": 1.0 - rec["fitness"],
                "cost": rec["cost"],
                "final": runs.train(plan) if runs and id(rec) in chosen else None,
            }
        )
    anchors = []
    for name, plan in anchor_plans(names):
        fits = budget.fits_mask(budget.costs.mask(plan))
        searched = [
            r
            for r in records
            if r["status"] == "ok" and FineTunePlan.from_dict(r["plan"]).key() == plan.key()
        ]
        same_fold = [r for r in searched if r["fold"] == fold]
        scored = (same_fold or searched)[:1]
        anchors.append(
            {
                "name": name,
                "plan": plan.to_dict(),
                "plan_text": plan.describe(),
                "cost": budget.record(plan),
                "within_budget": fits,
                "search": (
                    {
                        "candidate": scored[0]["candidate"],
                        "fold": scored[0]["fold"],
                        "val_score": 1.0 - scored[0]["fitness"],
                    }
                    if scored
                    else None
                ),
                "final": runs.train(plan) if runs and fits else None,
            }
        )
    for entry in front_entries:
        entry["dominated_by"] = _dominated_by(entry, anchors, key)
    pareto = {
        "objective": "pareto",
        "cost": axis,
        "cost_key": key,
        "metric": config.protocol.train.metric,
        "fold": fold,
        "generation": last,
        "budget": config.budget.to_dict(),
        "final_seeds": list(config.final_seeds) if final else [],
        "front": front_entries,
        "anchors": anchors,
        "evaluated": [
            {
                "candidate": r["candidate"],
                "generation": r["generation"],
                "fold": r["fold"],
                "role": r["role"],
                "status": r["status"],
                "fitness": r["fitness"],
                "val_score": 1.0 - r["fitness"],
                "cost": r["cost"],
                "on_front": r["candidate"] in on_front,
            }
            for r in records
            if r["status"] == "ok"
        ],
    }
    search.run.write(PARETO, pareto)
    reports.plot_pareto(pareto, search.run.path / PARETO_PLOT)
    (search.run.path / PARETO_TABLE).write_text(reports.pareto_table(pareto) + "\n")
    return pareto


def _dominated_by(
    entry: dict[str, Any], anchors: list[dict[str, Any]], key: str
) -> dict[str, list[str]] | None:
    """Per test metric, the anchors that dominate a front plan after the final training (test
    score no lower at a cost no higher, one of them strictly); None without final results."""
    if entry["final"] is None:
        return None
    out: dict[str, list[str]] = {}
    for metric in ("test_top1", "test_balanced"):
        mine = entry["final"][metric]
        if mine is None:
            continue
        point = (-mine["mean"], entry["cost"][key])
        out[metric] = [
            a["name"]
            for a in anchors
            if a["final"] is not None
            and a["final"][metric] is not None
            and dominates((-a["final"][metric]["mean"], a["cost"][key]), point)
        ]
    return out
