"""Searches with common random numbers (one fold for the whole search), re-ranking the best of
the whole search, other samplers, and a cost limit."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data
from test_rundir_reliability import StopAfter

from biotune.blocks import partition_blocks
from biotune.core.evolution import EvolutionConfig
from biotune.core.plan import FineTunePlan
from biotune.data import DatasetSplits
from biotune.errors import BioTuneError
from biotune.models import LoadedModel
from biotune.presets import evolution
from biotune.runner.config import SearchConfig
from biotune.runner.rerank import best_of_search
from biotune.runner.search import Search
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig

TINY = TrainConfig(epochs=1, patience=1, batch_size=16, eval_batch_size=32, base_lr=1e-2)


def _bench() -> Workbench:
    torch.manual_seed(0)
    model = make_tiny_cnn()
    splits = DatasetSplits(
        "tiny",
        ["a", "b", "c"],
        make_tiny_data(60),
        make_tiny_data(30, seed=1),
        make_tiny_data(30, seed=2),
        8,
    )
    return Workbench(
        LoadedModel(model, "tiny", 8, (0.5,) * 3, (0.5,) * 3, "random"),
        partition_blocks(model),
        splits,
    )


def _config(**changes) -> SearchConfig:
    protocol = replace(evolution().protocol, seeds=(0,), train=TINY, fold_policy="fixed")
    return replace(
        evolution(),
        evolution=EvolutionConfig(population_size=4, generations=2, elite=1),
        protocol=protocol,
        final=replace(TINY, epochs=2, patience=2),
        final_seeds=(0,),
        rerank=2,
        rerank_from="best",
        **changes,
    )


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "evaluations.jsonl").read_text().splitlines()]


def test_fixed_folds_train_every_evaluation_on_fold_0_and_never_retrain_an_elite(tmp_path):
    Search(_config(), tmp_path / "run", bench=_bench()).run_search(final=False)
    records = _records(tmp_path / "run")
    assert {r["fold"] for r in records} == {0}
    elites = [r for r in records if r["role"] == "elite"]
    assert elites and all(r["reused_from"] is not None for r in elites)  # memoised: free
    assert all(r["train_images"] == 0 for r in elites)


def test_rerank_best_takes_the_best_distinct_plans_of_the_whole_search(tmp_path):
    result = Search(_config(), tmp_path / "run", bench=_bench()).run_search(final=False)
    records = _records(tmp_path / "run")
    names = _bench().partition.names
    picks = best_of_search(records, names, 2)
    reranked = [json.loads(x) for x in (tmp_path / "run" / "rerank.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in reranked] == [c.id for c, _, _ in picks]
    best = min(records, key=lambda r: (r["fitness"], r["candidate"]))
    assert picks[0][0].id == best["candidate"]
    assert picks[0][2].key() != picks[1][2].key()
    assert result.best_plan in {FineTunePlan.from_dict(r["plan"]) for r in reranked}


def test_rerank_structures_takes_the_best_plan_of_each_set_of_trained_blocks():
    names = ["a", "b", "c"]

    def record(candidate: int, genes: list[float], fitness: float) -> dict:
        return {
            "candidate": candidate,
            "genes": genes,
            "fitness": fitness,
            "generation": 0,
            "role": "initial",
        }

    records = [
        record(0, [0.9, 0.1, 0.1, 0.5], 0.10),  # a x6.3
        record(1, [0.8, 0.1, 0.1, 0.5], 0.12),  # a x4: its local variant
        record(2, [0.9, 0.9, 0.9, 0.5], 0.30),  # a, b and c: full fine-tuning
        record(3, [0.7, 0.6, 0.1, 0.5], 0.20),  # a and b
        record(4, [0.1, 0.1, 0.1, 0.5], 0.05),  # nothing trained: never a pick
    ]
    best = best_of_search(records, names, 3)
    assert [c.id for c, _, _ in best] == [0, 1, 3]
    structures = best_of_search(records, names, 3, structures=True)
    assert [c.id for c, _, _ in structures] == [0, 3, 2]
    assert [p.trained for _, _, p in structures] == [("a",), ("a", "b"), ("a", "b", "c")]
    with pytest.raises(BioTuneError, match="--rerank-from structures"):
        replace(
            evolution(),
            protocol=replace(evolution().protocol, fold_policy="rotate"),
            rerank_from="structures",
        )


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_other_samplers_run_through_the_same_runner_and_resume(tmp_path, sampler):
    config = _config(sampler=sampler)
    whole = Search(config, tmp_path / "a", bench=_bench()).run_search(final=False)
    records = _records(tmp_path / "a")
    assert len(records) == config.evolution.total_evaluations
    assert {r["role"] for r in records} == {"initial"}
    # Interrupted after its fifth evaluation, then resumed: the same proposals and plan.
    with pytest.raises(KeyboardInterrupt):
        stop = [StopAfter(5)]
        Search(config, tmp_path / "b", bench=_bench(), callbacks=stop).run_search(final=False)
    resumed = Search(config, tmp_path / "b", bench=_bench()).run_search(resume=True, final=False)
    assert [r["genes"] for r in _records(tmp_path / "b")] == [r["genes"] for r in records]
    assert [r["fitness"] for r in _records(tmp_path / "b")] == [r["fitness"] for r in records]
    assert resumed.best_plan == whole.best_plan


def test_a_cost_limit_stops_the_proposals(tmp_path):
    config = _config(sampler="random", max_ft_equivalents=0.5)
    config = replace(config, evolution=replace(config.evolution, children_batch=1))
    Search(config, tmp_path / "run", bench=_bench()).run_search(final=False)
    records = _records(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "search_summary.json").read_text())["cost"]
    spent = sum(r["work"] + r.get("cache_work", 0.0) for r in records) / summary["ft_work_flops"]
    before_last = (
        spent
        - (records[-1]["work"] + records[-1].get("cache_work", 0.0)) / summary["ft_work_flops"]
    )
    assert len(records) < config.evolution.total_evaluations
    assert before_last < 0.5 <= spent  # stopped by the first evaluation past the limit


def test_comparing_across_generations_needs_common_folds():
    rotate = replace(evolution().protocol, fold_policy="rotate")
    with pytest.raises(BioTuneError, match="--rerank-from best"):
        replace(evolution(), protocol=rotate, rerank_from="best")
    with pytest.raises(BioTuneError, match="--sampler random"):
        replace(evolution(), protocol=rotate, rerank_from="winners", sampler="random")
    one_fold = replace(evolution().protocol, data_fraction=1.0)
    assert replace(evolution(), protocol=one_fold, sampler="tpe").sampler == "tpe"
    with pytest.raises(BioTuneError, match="max_ft_equivalents"):
        replace(evolution(), max_ft_equivalents=0)


def test_new_settings_round_trip_and_old_configurations_are_unchanged():
    config = _config(sampler="tpe", max_ft_equivalents=3.0)
    config = replace(config, evolution=replace(config.evolution, anchors=True, anchor_set="wide"))
    assert SearchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # The default of 2026-11-30 (rotating folds, the basic anchors) is stored as it was.
    old = evolution()
    old = replace(
        old,
        evolution=replace(old.evolution, anchor_set="basic", initial_size=None),
        protocol=replace(old.protocol, fold_policy="rotate"),
        rerank_from="winners",
        promote=0,
    )
    stored = old.to_dict()
    assert "sampler" not in stored and "fold_policy" not in stored["protocol"]
    assert "anchor_set" not in stored["evolution"] and "promote" not in stored
    assert SearchConfig.from_dict(stored) == old


def test_a_middle_rung_narrows_the_plans_the_final_recipe_trains(tmp_path):
    config = _config(promote=4, promote_epochs=2)
    result = Search(config, tmp_path / "run", bench=_bench()).run_search(final=False)
    run = tmp_path / "run"
    promoted = [json.loads(x) for x in (run / "promote.jsonl").read_text().splitlines()]
    reranked = [json.loads(x) for x in (run / "rerank.jsonl").read_text().splitlines()]
    names = _bench().partition.names
    picks = best_of_search(_records(run), names, 4)
    assert [r["candidate"] for r in promoted] == [c.id for c, _, _ in picks]
    # The search's own fold and seed, longer (the fidelity benchmark's `long`), never pruned.
    evaluated = {r["candidate"]: r for r in _records(run)}
    assert all(r["fold"] == 0 and r["seeds"] == [0] for r in promoted)
    assert all(r["epochs_run"] == 2 and r["status"] == "ok" for r in promoted)
    assert all(evaluated[r["candidate"]]["epochs"] == [1] for r in promoted)
    best_two = sorted(promoted, key=lambda r: (-r["val_balanced"], r["rank"]))[:2]
    assert [r["candidate"] for r in reranked] == [r["candidate"] for r in best_two]
    cost = json.loads((run / "search_summary.json").read_text())["cost"]
    assert cost["promote"]["plans"] == 4 and cost["promote"]["work_flops"] > 0
    assert result.best_plan in {FineTunePlan.from_dict(r["plan"]) for r in reranked}
    # Resumed, nothing is trained again and the choice is the same.
    again = Search(config, run, bench=_bench()).run_search(resume=True, final=False)
    assert again.best_plan == result.best_plan
    assert len((run / "promote.jsonl").read_text().splitlines()) == 4
    with pytest.raises(BioTuneError, match="must exceed --rerank"):
        _config(promote=2)


def test_a_search_logs_what_its_feature_cache_held_and_refused(tmp_path, caplog):
    protocol = replace(_config().protocol, cache_features=True, cache_memory=0.001)
    config = replace(_config(), protocol=protocol, rerank=0, rerank_from="last", promote=0)
    config = replace(config, evolution=replace(config.evolution, anchors=True))  # frozen prefixes
    with caplog.at_level("INFO", logger="biotune.search"):
        Search(config, tmp_path / "run", bench=_bench()).run_search(final=False)
    line = next(r.getMessage() for r in caplog.records if "feature cache:" in r.getMessage())
    assert "refused" in line and "over the budget" in line
    assert all(r["cached_prefix"] == 0 for r in _records(tmp_path / "run"))


def _lines(path) -> dict[int, dict]:
    """A rung's records by candidate, without their times (or the rank a derived run keeps)."""
    records = [json.loads(x) for x in path.read_text().splitlines()]
    return {
        r["candidate"]: {k: v for k, v in r.items() if k not in ("seconds", "rank")}
        for r in records
    }


def test_a_search_derived_for_other_rungs_ends_as_one_from_scratch(tmp_path):
    """The accuracy benchmark derives ``biotune-mfs`` from ``biotune-mf``'s run directories."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy" / "run.py"
    spec = importlib.util.spec_from_file_location("accuracy_run", path)
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)

    best = _config(promote=4, promote_epochs=2)
    structures = replace(best, rerank_from="structures")
    Search(best, tmp_path / "a", bench=_bench()).run_search(final=False)
    scratch = Search(structures, tmp_path / "b", bench=_bench()).run_search(final=False)
    accuracy.derive_run(tmp_path / "a", tmp_path / "c", structures)
    kept = set(_lines(tmp_path / "c" / "promote.jsonl"))
    derived = Search(structures, tmp_path / "c", bench=_bench()).run_search(
        resume=True, final=False
    )
    promoted = _lines(tmp_path / "b" / "promote.jsonl")
    assert kept and kept < set(promoted) < set(promoted) | set(
        _lines(tmp_path / "a" / "promote.jsonl")
    )
    for rung in ("promote.jsonl", "rerank.jsonl"):
        assert _lines(tmp_path / "c" / rung) == _lines(tmp_path / "b" / rung), rung
    assert derived.best_plan == scratch.best_plan
    cost = [json.loads((tmp_path / x / "search_summary.json").read_text())["cost"] for x in "bc"]
    assert cost[0]["work_flops"] == cost[1]["work_flops"]
