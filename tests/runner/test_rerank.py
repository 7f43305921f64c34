"""Re-ranking the best plans with the final recipe before choosing (multi-fidelity)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import make_tiny_cnn, make_tiny_data

from biotune.blocks import partition_blocks
from biotune.core.evolution import Candidate, EvolutionConfig
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.data import DatasetSplits
from biotune.models import LoadedModel
from biotune.presets import evolution
from biotune.runner.rerank import candidates, choose, generation_winners
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


def test_generation_winners_go_back_through_the_generations_one_per_structure():
    names = ("a", "b", "c", "head")

    def plan(**mults: float) -> np.ndarray:
        return encode_plan(
            FineTunePlan(tuple(BlockSetting(n, n in mults, mults.get(n, 1.0)) for n in names))
        )

    top, top_faster = plan(c=1.0, head=1.0), plan(c=2.0, head=1.0)
    head, head_faster = plan(head=1.0), plan(head=5.0)
    full = encode_plan(FineTunePlan.full(names))
    evaluations = [
        {"candidate": i, "genes": list(g), "generation": gen, "role": "child", "fitness": f}
        for i, (g, gen, f) in enumerate(
            [
                (top, 0, 0.4),
                (full, 0, 0.5),
                (top_faster, 1, 0.3),
                (head, 2, 0.2),
                (head_faster, 2, 0.25),
            ]
        )
    ]
    history = [{"best_id": 0}, {"best_id": 2}, {"best_id": 3}]
    last = [(Candidate(3, head, 2, "child"), 0.2), (Candidate(4, head_faster, 2, "child"), 0.25)]
    # Newest first; generation 1's winner trains the same blocks as generation 0's: skipped.
    picked = generation_winners(history, evaluations, last, names, 2)
    assert [c.id for c, _, _ in picked] == [3, 2]
    assert [f for _, f, _ in picked] == [0.2, 0.3]  # each scored on its own generation's fold
    # Fewer structures than k: topped up with the last generation's best distinct plans.
    picked = generation_winners(history[2:], evaluations, last, names, 2)
    assert [c.id for c, _, _ in picked] == [3, 4]


@pytest.mark.parametrize(("k", "source"), [(3, "last"), (2, "winners")])
def test_a_search_with_rerank_chooses_on_validation_and_reuses_the_winning_run(tmp_path, k, source):
    config = replace(
        evolution(),
        evolution=EvolutionConfig(population_size=4, generations=1, elite=1),
        protocol=replace(evolution().protocol, seeds=(0,), train=replace(TINY, epochs=1)),
        final=TINY,
        final_seeds=(0, 1),
        rerank=k,
        rerank_from=source,
    )
    result = Search(config, tmp_path / "run", bench=_bench()).run_search()
    run = tmp_path / "run"
    reranked = [json.loads(x) for x in (run / "rerank.jsonl").read_text().splitlines()]
    assert 1 <= len(reranked) <= k
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


class _Watch:
    """Notes which final-training seeds start; with ``stop_at``, interrupts the search (as a
    kill would) just after the re-ranking run of that rank is recorded."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.final_starts: list[int] = []

    def on_rerank_run(self, record: dict) -> None:
        if record["rank"] == self.stop_at:
            raise KeyboardInterrupt

    def on_final_start(self, seed: int, epochs: int) -> None:
        self.final_starts.append(seed)


def _same_bench() -> Workbench:
    """The same model every time (as a resumed search must find it)."""
    import torch

    torch.manual_seed(0)
    return _bench()


def _without_seconds(path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in path.read_text().splitlines()
    ]


def test_a_search_stopped_after_the_winning_rerank_run_never_trains_it_again(tmp_path):
    config = replace(
        evolution(),
        evolution=EvolutionConfig(population_size=4, generations=1, elite=1),
        protocol=replace(evolution().protocol, seeds=(0,), train=replace(TINY, epochs=1)),
        final=TINY,
        final_seeds=(0, 1),
        rerank=2,
        rerank_from="last",
    )
    whole = tmp_path / "whole"
    watch = _Watch()
    Search(config, whole, bench=_same_bench(), callbacks=[watch]).run_search()
    assert watch.final_starts == [1]
    reranked = [json.loads(x) for x in (whole / "rerank.jsonl").read_text().splitlines()]
    assert len(reranked) == 2
    winner = choose(reranked)["rank"]

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Search(config, run, bench=_same_bench(), callbacks=[_Watch(stop_at=winner)]).run_search()
    assert not (run / "final_runs.jsonl").exists()
    watch = _Watch()
    Search(config, run, bench=_same_bench(), callbacks=[watch]).run_search(resume=True)
    assert watch.final_starts == [1]  # seed 0 is the winning re-ranking run, not trained again
    for name in ("final_runs.jsonl", "rerank.jsonl"):
        assert _without_seconds(run / name) == _without_seconds(whole / name)
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
