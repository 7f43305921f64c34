"""Re-ranking the best plans with the final recipe before choosing (multi-fidelity)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from conftest import make_tiny_cnn, make_tiny_data

from biotune.blocks import partition_blocks
from biotune.core.evolution import Candidate, EvolutionConfig
from biotune.core.plan import FineTunePlan, encode_plan
from biotune.data import DatasetSplits
from biotune.models import LoadedModel
from biotune.presets import default
from biotune.runner.rerank import candidates, choose
from biotune.runner.search import Search
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig

TINY = TrainConfig(epochs=2, patience=2, batch_size=16, eval_batch_size=32, base_lr=1e-2)


def _bench() -> Workbench:
    model = make_tiny_cnn()
    val = make_tiny_data(30, seed=1)
    splits = DatasetSplits(
        "tiny", ["a", "b", "c"], make_tiny_data(60), val, make_tiny_data(30, seed=2), 8
    )
    return Workbench(
        LoadedModel(model, "tiny", 8, (0.5,) * 3, (0.5,) * 3, "random"),
        partition_blocks(model),
        splits,
    )


def test_candidates_are_the_first_distinct_plans_of_the_generation():
    names = ("a", "b", "c", "head")
    full = encode_plan(FineTunePlan.full(names))
    head = encode_plan(FineTunePlan.head_only(names))
    population = [
        (Candidate(i, genes, 1, "child"), 0.1 * i)
        for i, genes in enumerate([full, full * 0.999 + 0.0005, head, full])
    ]
    picked = candidates(population, names, 2)
    assert [c.id for c, _, _ in picked] == [0, 2]
    records = [
        {"candidate": 0, "rank": 0, "val_balanced": 0.5},
        {"candidate": 2, "rank": 1, "val_balanced": 0.5},
    ]
    assert choose(records)["candidate"] == 0  # a tie goes to the better search rank
    records[1]["val_balanced"] = 0.6
    assert choose(records)["candidate"] == 2


def test_a_search_with_rerank_chooses_on_validation_and_reuses_the_winning_run(tmp_path):
    config = replace(
        default(),
        evolution=EvolutionConfig(population_size=4, generations=1, elite=1),
        protocol=replace(default().protocol, seeds=(0,), train=replace(TINY, epochs=1)),
        final=TINY,
        final_seeds=(0, 1),
        rerank=3,
    )
    result = Search(config, tmp_path / "run", bench=_bench()).run_search()
    run = tmp_path / "run"
    reranked = [json.loads(x) for x in (run / "rerank.jsonl").read_text().splitlines()]
    assert 1 <= len(reranked) <= 3
    assert len({json.dumps(r["plan"], sort_keys=True) for r in reranked}) == len(reranked)
    winner = choose(reranked)
    assert result.best_plan == FineTunePlan.from_dict(winner["plan"])
    finals = [json.loads(x) for x in (run / "final_runs.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in finals] == [0, 1]  # seed 0 is the winning re-rank run, once
    assert finals[0]["val_balanced"] == winner["val_balanced"]
    assert finals[0]["test_top1"] == winner["test_top1"]
    cost = json.loads((run / "search_summary.json").read_text())["cost"]
    assert cost["rerank"]["plans"] == len(reranked)
    assert np.isclose(cost["work_flops"], cost["ft_equivalents"] * cost["ft_work_flops"])
    meta = json.loads((run / "finetuned.json").read_text())
    best_seed = max(finals, key=lambda r: r["val_balanced"])["seed"]
    assert meta["seed"] == best_seed
