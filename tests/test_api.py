"""The Python API end to end: a tiny real search (ImageNet Lite0 weights, offline data)."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

import biotune
from biotune.core.evolution import EvolutionConfig
from biotune.presets import default, evolution
from biotune.training import TrainConfig


def _tiny_config():
    config = evolution()
    return replace(
        config,
        data=replace(config.data, image_size=32, train_size=60, val_size=30, test_size=30),
        evolution=EvolutionConfig(population_size=4, generations=1, elite=1),
        protocol=replace(config.protocol, seeds=(0,), train=TrainConfig(epochs=1)),
        final=TrainConfig(epochs=2, patience=1),
        final_seeds=(0, 1),
    )


def test_tiny_search_with_real_pretrained_weights(tmp_path):
    result = biotune.search(tmp_path / "run", _tiny_config(), progress=False)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) == 4 + 1 * (3 * 1 + 3)
    assert {r["fold"] for r in records} == {0}  # one fold for all: scores compare
    assert all(0.0 <= r["fitness"] <= 1.0 for r in records)
    best = json.loads((run / "best_plan.json").read_text())
    assert biotune.FineTunePlan.from_dict(best) == result.best_plan
    assert result.best_plan.trained
    # the re-ranking may choose a plan of any generation (one per set of trained blocks); its
    # search fitness is the one its evaluation recorded
    chosen = [r for r in records if r["candidate"] == best["candidate"]]
    assert result.best_fitness in {r["fitness"] for r in chosen}
    final = json.loads((run / "final.json").read_text())
    assert len(final["runs"]) == 2
    assert 0.0 <= final["test_top1"]["mean"] <= 1.0
    assert 0 < final["trainable_share"] <= 1


def test_the_default_search_draws_random_plans_until_its_evaluations_cost_its_limit(tmp_path):
    config = replace(_tiny_config(), sampler=default().sampler, max_ft_equivalents=1.5)
    one_at_a_time = replace(config.evolution, generations=10, children_batch=1)
    config = replace(config, evolution=one_at_a_time)
    ends: list[bool] = []

    class End:
        def on_search_end(self, finished: bool) -> None:
            ends.append(finished)

    result = biotune.search(
        tmp_path / "run", config, progress=False, final=False, callbacks=[End()]
    )
    assert ends == [True]  # reaching the cost limit finishes a search: not "stopped"
    records = result.evaluations
    unit = result.cost["ft_work_flops"]
    spent = [r.get("work", 0.0) + r.get("cache_work", 0.0) for r in records]
    assert sum(spent[:-1]) / unit < 1.5 <= sum(spent) / unit  # stopped at the first past it
    assert len(records) < config.evolution.total_evaluations
    assert {r["role"] for r in records} == {"initial"}  # no elites, no children: random plans
    assert result.cost["rerank"]["plans"] == 2  # then the same rungs as the evolution's


def test_a_plan_applies_in_a_users_own_loop():
    loaded = biotune.load_model("efficientnet_lite0", num_classes=3)
    blocks = biotune.partition_blocks(loaded.model)
    genes = [0.9 if name in ("blocks.6", "neck", "head") else 0.1 for name in blocks.names]
    plan = biotune.decode_genome([*genes, 0.5], blocks.names)
    groups = biotune.apply_plan(loaded.model, blocks, plan, base_lr=1e-3)
    optimizer = torch.optim.Adam(groups)
    assert [g["name"] for g in optimizer.param_groups] == ["blocks.6", "neck", "head"]
    stem_before = loaded.model.bn1.running_mean.clone()
    loaded.model.train()
    x = torch.randn(4, 3, 32, 32)
    loss = loaded.model(x).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert torch.equal(stem_before, loaded.model.bn1.running_mean)
    assert loaded.model.conv_stem.weight.grad is None


def test_a_search_is_scaled_through_arguments():
    from biotune.api import scaled

    config = scaled(default(), population=4, generations=1, epochs=1, final_epochs=3)
    assert (config.evolution.population_size, config.evolution.generations) == (4, 1)
    assert (config.protocol.train.epochs, config.protocol.train.patience) == (1, 1)
    assert (config.final.epochs, config.final.patience) == (3, 2)
    assert scaled(default(), final_seeds=[5]).final_seeds == (5,)
    assert scaled(default()) == default()
    # The anchors keep their room in a smaller population; a larger one widens the first
    # generation to a population.
    assert config.evolution.initial_evaluations == default().evolution.initial_evaluations
    assert scaled(default(), population=12).evolution.initial_evaluations == 12
