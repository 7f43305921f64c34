"""Pareto fronts of accuracy against cost: non-dominated, one fold at a time, and resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_budget import BUDGETED, StopAfter, bench

from biotune.core.budget import BudgetConfig
from biotune.core.evolution import EvolutionConfig, anchor_genes
from biotune.core.pareto import (
    crowding,
    dominates,
    fold_front,
    front_ranks,
    non_dominated,
    pareto_order,
    plan_key,
    spread_along,
)
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.core.records import MEASURED_FIELDS
from biotune.reports import pareto_table, report, summary_lines
from biotune.runner._optimize import task_for
from biotune.runner.config import SearchConfig
from biotune.runner.fitness import PruneConfig
from biotune.runner.search import Search
from biotune.runner.tradeoff import anchor_plans

# -- the front, pure ---------------------------------------------------------------------------


def _random_points(seed: int, n: int = 40) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    points = [(round(float(a), 2), round(float(b), 2)) for a, b in rng.random((n, 2))]
    return points + points[:3]  # ties too


@pytest.mark.parametrize("seed", range(5))
def test_the_front_is_non_dominated_and_dominates_everything_else(seed):
    points = _random_points(seed)
    front = non_dominated(points)
    assert not any(dominates(points[j], points[i]) for i in front for j in range(len(points)))
    rest = set(range(len(points))) - set(front)
    assert all(any(dominates(points[i], points[j]) for i in front) for j in rest)


@pytest.mark.parametrize("seed", range(3))
def test_front_ranks_peel_the_fronts_in_order(seed):
    points = _random_points(seed)
    ranks = front_ranks(points)
    assert sorted(non_dominated(points)) == [i for i, r in enumerate(ranks) if r == 0]
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            if dominates(q, p):
                assert ranks[j] < ranks[i]


def test_pareto_order_puts_the_front_first_and_its_ends_before_its_middle():
    points = [(0.1, 0.9), (0.3, 0.5), (0.5, 0.45), (0.9, 0.1), (0.6, 0.6), (0.95, 0.95)]
    order = pareto_order(points)
    assert set(order[:2]) == {0, 3}  # the two ends of the front (infinite crowding distance)
    assert set(order[:4]) == {0, 1, 2, 3}
    assert order[-1] == 5
    assert crowding(points[:4])[0] == crowding(points[:4])[3] == float("inf")


def test_spread_along_keeps_both_ends():
    costs = [0.5, 0.01, 1.0, 0.2, 0.05, 0.3]
    assert spread_along(costs, None) == [1, 4, 3, 5, 0, 2]
    assert spread_along(costs, 2) == [1, 2]
    assert spread_along(costs, 3)[0] == 1 and spread_along(costs, 3)[-1] == 2


def _record(candidate: int, fold: int, fitness: float, share: float, status: str = "ok"):
    blocks = [
        {"name": "a", "train": share > 0.5, "lr_mult": 1.0},
        {"name": "b", "train": True, "lr_mult": round(1 + candidate / 100, 3)},
    ]
    return {
        "candidate": candidate,
        "generation": fold,
        "fold": fold,
        "fitness": fitness,
        "status": status,
        "plan": {"blocks": blocks},
        "cost": {"trainable_share": share},
    }


def test_the_front_of_a_fold_never_compares_scores_of_another_fold():
    records = [
        _record(0, 0, 0.30, 0.9),
        _record(1, 0, 0.50, 0.1),
        _record(2, 1, 0.40, 0.9),
        _record(3, 1, 0.60, 0.1),
        _record(4, 1, 0.45, 0.5),
        _record(5, 1, 0.10, 0.05, status="pruned"),
        _record(6, 1, 0.10, 0.05, status="invalid"),
    ]
    # Fold 0's (0.30, 0.9) and (0.50, 0.1) would dominate fold 1's plans: they are not looked at.
    assert [r["candidate"] for r in fold_front(records, 1, "trainable_share")] == [3, 4, 2]
    assert [r["candidate"] for r in fold_front(records, 0, "trainable_share")] == [1, 0]
    twin = {**_record(7, 1, 0.40, 0.9), "plan": records[2]["plan"]}  # memoised: counted once
    assert [r["candidate"] for r in fold_front([*records, twin], 1, "trainable_share")] == [3, 4, 2]


def test_plan_keys_agree_with_finetuneplan_keys():
    names = ("a", "b", "c")
    plans = [decode_genome(g, names) for g in np.random.default_rng(0).random((20, 4))]
    plans = [p for p in plans if p.trained]
    for p in plans:
        for q in plans:
            assert (plan_key(p.to_dict()) == plan_key(q.to_dict())) == (p.key() == q.key())


def test_the_anchor_plans_are_the_searchs_anchors():
    for n in (1, 2, 3, 10):
        names = tuple(f"b{i}" for i in range(n))
        searched = [decode_genome(g, names).key() for g in anchor_genes(n)]
        assert [p.key() for _, p in anchor_plans(names)] == searched


# -- a Pareto search -------------------------------------------------------------------------

PARETO = SearchConfig(
    evolution=EvolutionConfig(
        population_size=4, generations=3, elite=2, anchors=True, objective="pareto"
    ),
    protocol=replace(BUDGETED.protocol, prune=PruneConfig()),
    final=BUDGETED.final,
    final_seeds=(0, 1),
)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "evaluations.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in MEASURED_FIELDS} for x in lines]


def _without_seconds(value):  # noqa: ANN001, ANN202
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


@pytest.fixture(scope="module")
def pareto_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pareto") / "run"
    Search(PARETO, run_dir, bench=bench()).run_search()
    return run_dir


def test_a_pareto_search_writes_a_non_dominated_front_of_its_last_fold(pareto_run):
    pareto = json.loads((pareto_run / "pareto.json").read_text())
    records = _records(pareto_run)
    last = max(r["generation"] for r in records)
    assert pareto["fold"] == next(r["fold"] for r in records if r["generation"] == last)
    same_fold = [r for r in records if r["fold"] == pareto["fold"] and r["status"] == "ok"]
    front = pareto["front"]
    assert front and all(e["fold"] == pareto["fold"] for e in front)
    points = [(e["fitness"], e["cost"]["trainable_share"]) for e in front]
    assert not any(dominates(q, p) for p in points for q in points)
    for rec in same_fold:  # every plan of that fold is on the front or dominated by it
        point = (rec["fitness"], rec["cost"]["trainable_share"])
        assert point in points or any(dominates(p, point) for p in points)
    assert [a["name"] for a in pareto["anchors"]] == [
        "full fine-tuning",
        "top half",
        "linear probing",
    ]
    for entry in [*front, *pareto["anchors"]]:
        assert len(entry["final"]["seeds"]) == 2 and entry["final"]["test_top1"] is not None
    assert all(set(e["dominated_by"]) == {"test_top1", "test_balanced"} for e in front)
    for name in ("pareto.png", "pareto.md"):
        assert (pareto_run / name).stat().st_size > 0


def test_a_pareto_search_turns_early_termination_off(pareto_run):
    """Pruning compares a child with the most accurate elites: it would cut cheap plans that
    belong on the front. The protocol asks for it; the runner gives children no reference."""
    assert PARETO.protocol.prune is not None
    records = _records(pareto_run)
    assert all(r["status"] != "pruned" for r in records)
    child = next(r for r in records if r["role"] == "child")
    candidate = SimpleNamespace(
        id=child["candidate"], genes=child["genes"], generation=child["generation"], role="child"
    )
    done = {r["candidate"]: r for r in records}
    assert task_for(candidate, done).reference  # an accuracy search would prune
    assert task_for(candidate, done, False).reference == ()


def test_the_pareto_report_and_table_show_the_front_and_the_anchors(pareto_run, tmp_path):
    pareto = json.loads((pareto_run / "pareto.json").read_text())
    table = pareto_table(pareto).splitlines()
    assert len(table) == 2 + len(pareto["front"]) + len(pareto["anchors"])
    assert any(line.startswith("| linear probing |") for line in table)
    paths = report(pareto_run, tmp_path / "report")
    assert (tmp_path / "report" / "pareto.png") in paths
    assert any("| front 1 |" in line for line in summary_lines(pareto_run))


@pytest.mark.parametrize(("stop", "event"), [(7, "on_evaluation"), (3, "on_final_run")])
def test_a_pareto_search_resumes_to_the_uninterrupted_front(pareto_run, tmp_path, stop, event):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Search(PARETO, run_dir, bench=bench(), callbacks=[StopAfter(stop, event)]).run_search()
    Search(PARETO, run_dir, bench=bench()).run_search(resume=True)
    assert _records(run_dir) == _records(pareto_run)
    resumed, whole = (json.loads((d / "pareto.json").read_text()) for d in (run_dir, pareto_run))
    assert _without_seconds(resumed) == _without_seconds(whole)


def test_a_pareto_search_within_a_budget_keeps_its_front_and_anchors_within_it(tmp_path):
    config = SearchConfig(
        evolution=PARETO.evolution,
        protocol=PARETO.protocol,
        final=PARETO.final,
        final_seeds=(0,),
        budget=BudgetConfig(max_trainable=0.35, pareto_final=1),
    )
    result = Search(config, tmp_path / "run", bench=bench()).run_search()
    pareto = result.pareto
    assert all(e["cost"]["trainable_share"] <= 0.35 for e in pareto["front"])
    assert sum(e["final"] is not None for e in pareto["front"]) == 1
    over = [a for a in pareto["anchors"] if not a["within_budget"]]
    assert [a["name"] for a in over] == ["full fine-tuning", "top half"]
    assert all(a["final"] is None for a in over)  # never trained, not even at the end
    names = [a["name"] for a in pareto["anchors"] if a["final"] is not None]
    assert names == ["linear probing"]
    best = FineTunePlan.from_dict(json.loads((tmp_path / "run" / "best_plan.json").read_text()))
    assert best == result.best_plan  # the plan the search returned, within the budget
    assert best.key() in {FineTunePlan.from_dict(e["plan"]).key() for e in pareto["front"]}
