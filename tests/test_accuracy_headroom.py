"""The accuracy benchmark's headroom: what the best baseline gains over full fine-tuning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(scores: dict[str, dict[str, tuple[float, float]]]) -> list[dict]:
    return [
        {"dataset": d, "method": m, "val_balanced": val, "test_top1": test}
        for d, by in scores.items()
        for m, (val, test) in by.items()
    ]


def test_headroom_picks_on_validation_and_with_hindsight(bench):
    base = {m: (0.5, 0.5) for m in bench.BASELINES}
    a = {**base, "full": (0.80, 0.90), "l1sp": (0.90, 0.91), "lora": (0.70, 0.95)}
    b = {**base, "full": (0.90, 0.80), "linear": (0.85, 0.84)}
    room = bench.headroom(_rows({"a": a, "b": b}), ["a", "b"])
    assert room["by_dataset"]["a"]["validation"]["method"] == "l1sp"
    assert room["by_dataset"]["a"]["hindsight"]["method"] == "lora"
    assert room["by_dataset"]["b"]["validation"]["method"] == "full"
    assert room["validation_mean_gain"] == pytest.approx((1.0 + 0.0) / 2)
    assert room["hindsight_mean_gain"] == pytest.approx((5.0 + 4.0) / 2)


def test_headroom_waits_for_every_baseline(bench):
    scores = {m: (0.5, 0.5) for m in bench.BASELINES if m != "autorgn"}
    assert bench.headroom(_rows({"a": scores}), ["a"]) is None


def _runs(values: list[float]) -> list[dict]:
    return [{"seed": s, "test_top1": v} for s, v in enumerate(values)]


def test_targets_report_the_worst_search_and_the_paired_gain_over_random_search(bench):
    full = _runs([0.90, 0.90, 0.90, 0.90, 0.90])
    mf = _runs([0.92, 0.91, 0.885, 0.93, 0.92])  # seed 2: 1.5 points below full's mean
    rnd = _runs([0.91, 0.91, 0.89, 0.92, 0.90])
    rows = {
        "a": {
            "full": {"runs": full, "whole_ft": 3.0},
            bench.DEFAULT_METHOD: {"runs": mf, "whole_ft": 2.0},
            "random-search": {"runs": rnd, "whole_ft": 2.0},
        }
    }
    comparisons = [
        {
            "dataset": "a",
            "method": bench.DEFAULT_METHOD,
            "vs_full": bench.paired(mf, full, "test_top1"),
            "vs_best": {"high": 0.5},
        }
    ]
    room = {"validation_mean_gain": 0.5, "hindsight_mean_gain": 2.0}
    out = bench.targets(rows, comparisons, room, ["a"])
    assert out["worst_search"] == {"dataset": "a", "seed": 2, "points": pytest.approx(-1.5)}
    assert not out["checks"]["worst_search_within_1_point_of_full"]
    assert out["mean_gain_over_full"] == pytest.approx(1.3)
    assert out["checks"]["gain_at_least_best_baseline_validation"]
    assert not out["checks"]["gain_at_least_best_baseline_hindsight (stretch)"]
    assert (
        out["vs_random_search"]["mean"] == pytest.approx(0.7) and out["vs_random_search"]["n"] == 5
    )
    assert out["checks"]["beats_random_search_at_equal_cost"]
    assert out["checks"]["whole_search_at_most_full_grid"]
    assert bench.targets(rows, comparisons, None, ["a"]) is None
    # biotune-mfs is compared with the arms that run its rungs: until they exist, no verdict.
    rows["a"][bench.STRUCTURES_METHOD] = rows["a"][bench.DEFAULT_METHOD]
    comparisons[0]["method"] = bench.STRUCTURES_METHOD
    mfs = bench.targets(rows, comparisons, room, ["a"], bench.STRUCTURES_METHOD)
    assert "beats_random_search_at_equal_cost" not in mfs["checks"] and not mfs["vs_arms"]
    rows["a"]["random-search-s"] = rows["a"]["random-search"]
    mfs = bench.targets(rows, comparisons, room, ["a"], bench.STRUCTURES_METHOD)
    assert mfs["vs_random_search"]["mean"] == pytest.approx(0.7)


def test_the_issue25_rule_adopts_the_candidate_only_if_close_on_validation_and_cheaper(bench):
    def row(val: float, ft: float) -> dict:
        return {"runs": [{"seed": 0, "val_balanced": val}], "whole_ft": ft}

    def rows(mf_val: float, mf_ft: float) -> dict:
        return {
            "a": {
                "full": row(0.90, 3.5),
                bench.CURRENT_DEFAULT: row(0.960, 2.8),
                bench.DEFAULT_METHOD: row(mf_val, mf_ft),
            }
        }

    assert bench.adopt_rule(rows(0.9585, 3.4), ["a"])["adopted"] is True  # 0.15 below: close
    assert bench.adopt_rule(rows(0.9570, 3.4), ["a"])["adopted"] is False  # 0.3 below
    assert bench.adopt_rule(rows(0.9700, 3.6), ["a"])["adopted"] is False  # dearer than grid
    incomplete = {"a": {"full": row(0.9, 3.5), bench.CURRENT_DEFAULT: row(0.96, 2.8)}}
    assert bench.adopt_rule(incomplete, ["a"])["adopted"] is None


def test_the_structures_rule_needs_a_better_worst_search_on_validation(bench):
    def row(vals: list[float], ft: float) -> dict:
        runs = [{"seed": i, "val_balanced": v} for i, v in enumerate(vals)]
        return {"runs": runs, "whole_ft": ft}

    def rows(mfs: list[float], ft: float = 3.3) -> dict:
        return {
            "a": {
                "full": row([0.95, 0.95], 3.5),
                bench.DEFAULT_METHOD: row([0.97, 0.92], 3.2),
                bench.STRUCTURES_METHOD: row(mfs, ft),
            }
        }

    adopted = bench.adopt_structures(rows([0.959, 0.93]), ["a"])
    assert adopted["adopted"] is True  # 0.05 points lower on average, a better worst search
    assert adopted["worst_val"] == pytest.approx(-0.02)
    assert adopted["current_worst_val"] == pytest.approx(-0.03)
    assert bench.chosen_default(rows([0.959, 0.93]), ["a"]) == bench.STRUCTURES_METHOD
    assert bench.adopt_structures(rows([0.98, 0.92]), ["a"])["adopted"] is False  # same worst
    assert bench.adopt_structures(rows([0.954, 0.93]), ["a"])["adopted"] is False  # mean: -0.3
    assert bench.adopt_structures(rows([0.97, 0.93], 3.6), ["a"])["adopted"] is False  # dear
    assert bench.chosen_default(rows([0.98, 0.92]), ["a"]) == bench.DEFAULT_METHOD


def test_sittings_side_by_side_keep_each_others_wall_time(bench, tmp_path):
    path = tmp_path / "wall.json"
    first = bench.Sitting(path, {"sessions": []}, 1, ["a"], ["m"])
    second = bench.Sitting(path, {"sessions": []}, 1, ["b"], ["n"])
    first.end()  # written last by the first: the second's entry must survive it
    second.end()
    first.beat()
    sessions = json.loads(path.read_text())["sessions"]
    assert sorted(s["datasets"][0] for s in sessions) == ["a", "b"]
    assert all(s["ended"] for s in sessions)


def test_a_derived_method_reuses_its_sources_run_only_for_the_same_plan(bench, tmp_path):
    from biotune.core.plan import FineTunePlan

    data = bench.Dataset.__new__(bench.Dataset)  # only the records, no workbench
    data.records, data.name, data.log = tmp_path, "a", lambda _: None
    plan = FineTunePlan.full(["x", "y"])
    source = {"method": "random-search", "seed": 3, "plan": plan.to_dict(), "test_top1": 0.9}
    bench._write(tmp_path / "a" / "random-search" / "lr0.001-seed3.json", source)
    data._same_run("random-search-s", 1e-3, 3, plan)
    copied = json.loads((tmp_path / "a" / "random-search-s" / "lr0.001-seed3.json").read_text())
    assert copied == {**source, "method": "random-search-s", "same_run_as": "random-search"}
    other = FineTunePlan.head_only(["x", "y"])
    bench._write(tmp_path / "a" / "random-search" / "lr0.001-seed4.json", {**source, "seed": 4})
    data._same_run("random-search-s", 1e-3, 4, other)
    assert not (tmp_path / "a" / "random-search-s" / "lr0.001-seed4.json").exists()


def test_the_last_rule_prefers_the_cheapest_method_that_is_as_good_on_validation(bench):
    anchors, random_search, evolution = bench.FINAL_CANDIDATES

    def row(vals: list[float], ft: float) -> dict:
        return {
            "runs": [{"seed": i, "val_balanced": v} for i, v in enumerate(vals)],
            "whole_ft": ft,
        }

    def rows(a: list[float], r: list[float], e: list[float], a_ft: float = 1.8) -> dict:
        return {
            "x": {
                "full": row([0.95, 0.95], 3.5),
                anchors: row(a, a_ft),
                random_search: row(r, 3.2),
                evolution: row(e, 3.1),
            }
        }

    assert (
        bench.random_search_rule(rows([0.96, 0.95], [0.96, 0.95], [0.96, 0.95]), ["x"])["chosen"]
        == anchors
    )
    # the anchors 0.5 points lower on average: random search and the evolution tie, no change
    tie = bench.random_search_rule(rows([0.955, 0.945], [0.96, 0.95], [0.96, 0.95]), ["x"])
    assert tie["chosen"] == evolution
    assert not tie["candidates"][anchors]["qualifies"]
    # the evolution's worst search 1.5 points below random search's: random search
    worse = bench.random_search_rule(rows([0.9, 0.9], [0.96, 0.95], [0.975, 0.935]), ["x"])
    assert worse["candidates"][evolution]["worst_val"] == pytest.approx(-0.015)
    assert worse["chosen"] == random_search
    # the anchors as good but dearer than full fine-tuning's grid: not them
    dear = rows([0.96, 0.95], [0.96, 0.95], [0.96, 0.95], a_ft=3.6)
    assert bench.random_search_rule(dear, ["x"])["chosen"] == evolution
    incomplete = rows([0.96, 0.95], [0.96, 0.95], [0.96, 0.95])
    del incomplete["x"][anchors]
    assert bench.random_search_rule(incomplete, ["x"])["chosen"] is None
