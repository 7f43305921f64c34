"""The search's speed-ups change its cost, never its result: caching, cost accounting, pruning,
memoisation."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import make_tiny_cnn, make_tiny_data
from torch import nn

import biotune.runner.fitness as fitness_module
from biotune.blocks import partition_blocks
from biotune.core import cost
from biotune.core.evolution import EvolutionConfig
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.data import DatasetSplits
from biotune.features import FeatureCache, batch_sizes_for, block_chain, train_plan_cached
from biotune.measure import block_flops
from biotune.models import LoadedModel
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.fitness import Evaluator, PruneConfig, PruneHooks, SearchProtocol
from biotune.runner.search import Search
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig, batches, train_plan

TRAIN = TrainConfig(epochs=3, patience=5, batch_size=16, eval_batch_size=32, base_lr=1e-2)


def _splits() -> DatasetSplits:
    val = make_tiny_data(48, seed=1)
    return DatasetSplits("tiny", ["a", "b", "c"], make_tiny_data(96), val, val, 8)


def _plan(names: tuple[str, ...], frozen: int, lr: float = 1.0) -> FineTunePlan:
    return FineTunePlan(tuple(BlockSetting(n, i >= frozen, lr) for i, n in enumerate(names)))


def _protocol(**kw) -> SearchProtocol:
    return SearchProtocol(**{"data_fraction": 0.5, "seeds": (0, 1), "train": TRAIN, **kw})


# ----------------------------------------------------------------------------------- block chain


@pytest.mark.parametrize(
    "build",
    [
        make_tiny_cnn,
        lambda: timm.create_model("resnet18", num_classes=3, drop_rate=0.2),
        lambda: torchvision.models.resnet18(num_classes=3),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=3),
    ],
    ids=["sequential", "timm-resnet", "tv-resnet", "tv-mobilenet"],
)
def test_block_chain_composes_to_the_models_forward(build):
    torch.manual_seed(0)
    model = build().eval()
    partition = partition_blocks(model)
    x = torch.randn(2, 3, 32, 32)
    stages = block_chain(model, partition, x)
    assert stages is not None and len(stages) == len(partition)
    out = x
    with torch.no_grad():
        for stage in stages:
            out = stage(out)
        assert torch.allclose(out, model(x), atol=1e-5)


def test_block_chain_is_none_for_a_model_it_cannot_split():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head((self.a(x) + self.b(x)).mean((2, 3)))

    model = Branchy()
    assert block_chain(model, partition_blocks(model), torch.randn(2, 3, 8, 8)) is None


def test_a_chain_that_disagrees_with_forward_is_refused(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    tiny_cnn.forward = lambda x: torch.zeros(len(x), 3)  # the chain no longer equals forward
    assert block_chain(tiny_cnn, partition, torch.randn(2, 3, 8, 8)) is None


# ------------------------------------------------------------------------------------ caching


@pytest.mark.parametrize("frozen", [1, 2, 3])
def test_cached_training_equals_uncached_training(tiny_cnn, frozen):
    partition = partition_blocks(tiny_cnn)
    splits = _splits()
    plan = _plan(partition.names, frozen)
    cache = FeatureCache(tiny_cnn, block_chain(tiny_cnn, partition), 10**8, batch_size=32)
    train_f = cache.features("train", splits.train, frozen)
    val_f = cache.features("val", splits.val, frozen)
    _, plain = train_plan(tiny_cnn, partition, plan, splits.train, splits.val, TRAIN, seed=3)
    _, cached = train_plan_cached(tiny_cnn, partition, plan, train_f, val_f, TRAIN, seed=3)
    assert [h["val_balanced"] for h in cached.history] == [h["val_balanced"] for h in plain.history]
    np.testing.assert_allclose(
        [h["train_loss"] for h in cached.history],
        [h["train_loss"] for h in plain.history],
        atol=1e-5,
    )
    assert cached.val.balanced == plain.val.balanced


@pytest.mark.parametrize(
    "build, frozen",
    [
        (make_tiny_cnn, 2),
        (lambda: torchvision.models.resnet18(num_classes=3), 2),
        (lambda: torchvision.models.resnet18(num_classes=3), 4),
        (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=3), 3),
    ],
    ids=["sequential-2", "tv-resnet-2", "tv-resnet-4", "timm-lite0-3"],
)
def test_cached_training_is_bit_identical_to_uncached(build, frozen):
    """Batch sizes that do not divide the data: the last batch of an epoch is smaller, and CPU
    kernels round differently by batch size; the cache must serve each batch from features
    computed at that size."""
    torch.manual_seed(0)
    model = build()
    partition = partition_blocks(model)
    train, val = make_tiny_data(40, size=16), make_tiny_data(27, size=16, seed=1)
    config = TrainConfig(epochs=2, patience=5, batch_size=16, eval_batch_size=10, base_lr=1e-2)
    plan = _plan(partition.names, frozen)
    stages = block_chain(model, partition, val.images[:2])
    assert stages is not None
    cache = FeatureCache(model, stages, 10**9, batch_size=config.eval_batch_size)
    train_f = cache.features("train", train, frozen, batch_sizes_for(len(train), 16))
    val_f = cache.features("val", val, frozen)
    m_plain, plain = train_plan(model, partition, plan, train, val, config, seed=1)
    m_cached, cached = train_plan_cached(model, partition, plan, train_f, val_f, config, seed=1)
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in plain.history]
    assert [h["val_loss"] for h in cached.history] == [h["val_loss"] for h in plain.history]
    for (name, a), b in zip(
        m_plain.state_dict().items(), m_cached.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "build, frozen",
    [(lambda: torchvision.models.resnet18(num_classes=3), 3)],
    ids=["tv-resnet-3"],
)
def test_cached_channels_last_training_is_bit_identical_to_uncached(build, frozen):
    """channels_last rounds convolutions differently: the cache runs the frozen prefix in the
    trainings' memory format, and puts the shared pretrained model back as it was."""
    torch.manual_seed(0)
    model = build()
    partition = partition_blocks(model)
    train, val = make_tiny_data(40, size=16), make_tiny_data(27, size=16, seed=1)
    config = TrainConfig(
        epochs=2, patience=5, batch_size=16, eval_batch_size=10, base_lr=1e-2, channels_last=True
    )
    plan = _plan(partition.names, frozen)
    stages = block_chain(model, partition, val.images[:2])
    assert stages is not None
    cache = FeatureCache(model, stages, 10**9, batch_size=10, channels_last=True)
    train_f = cache.features("train", train, frozen, batch_sizes_for(len(train), 16))
    val_f = cache.features("val", val, frozen)
    assert all(p.is_contiguous() for p in model.parameters())
    m_plain, plain = train_plan(model, partition, plan, train, val, config, seed=1)
    m_cached, cached = train_plan_cached(model, partition, plan, train_f, val_f, config, seed=1)
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in plain.history]
    for (name, a), b in zip(
        m_plain.state_dict().items(), m_cached.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "build, frozen",
    [
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), 3),
        (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=3), 6),
    ],
    ids=["tv-mobilenet-3", "timm-lite0-6"],
)
def test_cached_features_match_the_live_prefix_batch_by_batch(build, frozen):
    """Where a feature map is tiny (1x1, 2x2), some CPU kernels round by an image's place in its
    batch, so bit-identity cannot hold; the features served per training batch still agree with
    running the frozen prefix on that batch to float rounding."""
    torch.manual_seed(0)
    model = build().eval()
    partition = partition_blocks(model)
    train = make_tiny_data(40, size=16)
    stages = block_chain(model, partition, train.images[:2])
    cache = FeatureCache(model, stages, 10**9, batch_size=10)
    features = cache.features("train", train, frozen, batch_sizes_for(len(train), 16))
    live_batches = batches(train, 16, shuffle=True, seed=7)
    for (x, y), (f, fy) in zip(
        live_batches, batches(features, 16, shuffle=True, seed=7), strict=True
    ):
        with torch.no_grad():
            for stage in stages[:frozen]:
                x = stage(x)
        assert torch.equal(y, fy)
        torch.testing.assert_close(f, x, rtol=1e-5, atol=1e-6)


def test_cached_evaluation_scores_like_uncached_and_says_so(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    genes = encode_plan(_plan(partition.names, 2, lr=2.0))
    plain = Evaluator(tiny_cnn, partition, _splits(), _protocol()).evaluate(0, genes, 0)
    evaluator = Evaluator(tiny_cnn, partition, _splits(), _protocol(cache_features=True))
    cached = evaluator.evaluate(0, genes, 0)
    assert evaluator.cache_status == "on"
    assert plain.cached_prefix == 0 and cached.cached_prefix == 2
    assert cached.scores == plain.scores and cached.fitness == plain.fitness
    np.testing.assert_allclose(cached.curves, plain.curves, atol=1e-5)
    assert cached.train_images == plain.train_images
    assert cached.work < plain.work
    assert cached.cache_images == 2 * (48 + 48)  # blocks 0 and 1, once for the fold and val
    again = evaluator.evaluate(1, genes, 0)
    assert again.cache_work == 0 and again.scores == cached.scores


def test_lite0_cached_evaluation_equals_uncached():
    from biotune.runner.workbench import prepare

    bench = prepare(DataConfig(image_size=32, train_size=40, val_size=20, test_size=20))
    train = TrainConfig(epochs=1, batch_size=16, eval_batch_size=64)
    genes = encode_plan(_plan(bench.partition.names, 5))
    scored = [
        Evaluator(
            bench.model,
            bench.partition,
            bench.splits,
            SearchProtocol(seeds=(0,), train=train, cache_features=cache),
        ).evaluate(0, genes, 0)
        for cache in (False, True)
    ]
    assert [s.cached_prefix for s in scored] == [0, 5]
    # Lite0's 2x2 feature maps at 32 px round by an image's place in its batch (see
    # test_cached_features_match_the_live_prefix_batch_by_batch): the two runs may part by one
    # of the 20 validation images (0.05 balanced accuracy), never more.
    assert abs(scored[0].scores[0] - scored[1].scores[0]) <= 0.05 + 1e-9
    assert (scored[0].train_images, scored[0].epochs) == (scored[1].train_images, scored[1].epochs)


def test_cache_stays_within_its_budget_and_falls_back_past_it(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    splits = _splits()
    stages = block_chain(tiny_cnn, partition)
    one_entry = FeatureCache(tiny_cnn, stages, 10**9).entry_bytes(splits.train, 1)
    cache = FeatureCache(tiny_cnn, stages, int(one_entry * 1.5))
    assert cache.features("a", splits.train, 1) is not None
    assert cache.features("b", splits.train, 1) is not None  # evicts "a"
    assert cache.used_bytes <= cache.budget_bytes and cache.peak_bytes <= cache.budget_bytes
    assert cache.features("c", make_tiny_data(400), 1) is None and cache.skipped == 1

    tiny_budget = _protocol(cache_features=True, cache_memory=one_entry / 2**20 / 10)
    record = Evaluator(tiny_cnn, partition, splits, tiny_budget).evaluate(
        0, encode_plan(_plan(partition.names, 1)), 0
    )
    assert record.cached_prefix == 0 and record.status == "ok"


def test_a_deeper_prefix_is_built_from_a_cached_shallower_one(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    cache = FeatureCache(tiny_cnn, block_chain(tiny_cnn, partition), 10**9)
    data = make_tiny_data(96)
    cache.features("train", data, 1)
    deep = cache.features("train", data, 3)
    assert cache.stage_images == [96, 96, 96, 0]  # block 0 ran once, not twice
    with torch.no_grad():  # the parameter-free pooling after block 2 belongs to its stage
        direct = tiny_cnn.eval()[:4](data.images)
    torch.testing.assert_close(deep.images, direct)


def test_no_caching_when_frozen_blocks_train_in_train_mode(tiny_cnn):
    protocol = _protocol(
        cache_features=True,
        train=TrainConfig(epochs=1, batch_size=16, frozen_eval=False),
    )
    evaluator = Evaluator(tiny_cnn, partition_blocks(tiny_cnn), _splits(), protocol)
    assert evaluator.cache is None and "frozen_eval" in evaluator.cache_status


# --------------------------------------------------------------------------------------- cost


def test_cached_prefix_costs_less_work():
    flops = [4.0, 3.0, 2.0, 1.0]
    assert cost.run_work(flops, 2, 2, 10, 5) < cost.run_work(flops, 0, 2, 10, 5)
    assert cost.run_work(flops, 0, 2, 10, 0) == 10 * (10 + 2 * 3)
    assert cost.cache_work(flops, [5, 5, 0, 0]) == 35


def test_block_flops_add_up_to_the_whole_model(tiny_cnn):
    from torch.utils.flop_counter import FlopCounterMode

    partition = partition_blocks(tiny_cnn)
    flops = block_flops(tiny_cnn, partition, torch.randn(3, 8, 8))
    with FlopCounterMode(display=False) as counter:
        tiny_cnn.eval()(torch.randn(1, 3, 8, 8))
    assert sum(flops) == pytest.approx(counter.get_total_flops())
    assert all(f > 0 for f in flops)


def test_one_full_fine_tuning_is_one_ft_equivalent(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    protocol = SearchProtocol(data_fraction=1.0, seeds=(0,), train=TRAIN)
    evaluator = Evaluator(tiny_cnn, partition, _splits(), protocol)
    record = evaluator.evaluate(0, encode_plan(FineTunePlan.full(partition.names)), 0)
    assert record.epochs == [TRAIN.epochs]
    summary = cost.search_cost([record.to_dict()], evaluator.ft_work)
    assert summary["ft_equivalents"] == pytest.approx(1.0, rel=1e-9)


# ------------------------------------------------------------------------------------ pruning


def test_pruning_stops_a_clearly_worse_run(tiny_cnn):
    partition = partition_blocks(tiny_cnn)
    protocol = _protocol(prune=PruneConfig(min_epochs=1, quantile=0.5))
    evaluator = Evaluator(tiny_cnn, partition, _splits(), protocol)
    genes = encode_plan(_plan(partition.names, 3, lr=0.2))  # head only, slow: clearly worse
    reference = [[1.0, 1.0, 1.0], [0.9, 1.0, 1.0]]
    record = evaluator.evaluate(5, genes, 1, "child", reference)
    assert record.status == "pruned" and record.pruned_at == 1
    assert record.epochs == [1] and len(record.scores) == 1  # the second seed never ran
    assert record.fitness == pytest.approx(1 - record.scores[0])
    free = evaluator.evaluate(5, genes, 1, "child", None)
    assert free.status == "ok" and free.epochs == [3, 3] and free.pruned_at is None
    assert record.work < free.work / 3


def test_pruning_rule():
    hooks = PruneHooks([[0.5, 0.7, 0.8], [0.3, 0.9]], PruneConfig(min_epochs=2, quantile=0.5))
    assert not hooks.should_stop(0, 0.0)  # before min_epochs
    assert hooks.threshold(1) == pytest.approx(0.8)  # median of best-so-far 0.7 and 0.9
    assert hooks.should_stop(1, 0.79)
    assert hooks.threshold(2) == pytest.approx(0.85)  # a finished curve holds its best
    assert not PruneHooks([], PruneConfig()).should_stop(3, 0.0)  # no reference: never
    assert not PruneHooks([[1.0]], PruneConfig(enabled=False)).should_stop(3, 0.0)
    last = PruneHooks([[1.0, 1.0]], PruneConfig(), last_epoch=1)
    assert last.should_stop(0, 0.1) and not last.should_stop(1, 0.1)  # nothing left to save


def test_protocol_round_trips_and_old_configs_load():
    protocol = _protocol(cache_features=True, prune=PruneConfig(quantile=0.25, margin=0.02))
    assert SearchProtocol.from_dict(protocol.to_dict()) == protocol
    old = _protocol().to_dict()
    for key in ("cache_features", "prune", "cpu_threads"):
        old.pop(key)
    assert SearchProtocol.from_dict(old) == _protocol(cpu_threads=None)


def test_an_evaluation_runs_on_the_protocols_threads_and_restores_them(tiny_cnn, monkeypatch):
    seen = []
    real = fitness_module.train_plan

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fitness_module, "train_plan", spy)
    partition = partition_blocks(tiny_cnn)
    evaluator = Evaluator(tiny_cnn, partition, _splits(), _protocol(cpu_threads=1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluator.evaluate(0, encode_plan(FineTunePlan.full(partition.names)), 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]


# -------------------------------------------------------------------------------- memoisation


def test_a_memoised_plan_is_not_trained_again(tiny_cnn, tmp_path, monkeypatch):
    calls = []
    real = fitness_module.train_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fitness_module, "train_plan", counting)
    splits = _splits()
    partition = partition_blocks(tiny_cnn)
    bench = Workbench(
        LoadedModel(tiny_cnn, "tiny", 8, (0.0,) * 3, (1.0,) * 3, "none"), partition, splits
    )
    config = SearchConfig(
        evolution=EvolutionConfig(population_size=4, generations=2, elite=1),
        protocol=SearchProtocol(
            data_fraction=1.0, seeds=(0,), train=TrainConfig(epochs=1, batch_size=32)
        ),
    )
    result = Search(config, tmp_path / "run", bench=bench).run_search(final=False)
    records = result.evaluations
    reused = [r for r in records if r["reused_from"] is not None]
    assert any(r["role"] == "elite" for r in reused)  # same plan, same (only) fold
    for r in reused:
        original = next(o for o in records if o["candidate"] == r["reused_from"])
        assert r["train_images"] == 0 and r["work"] == 0
        assert r["scores"] == original["scores"] and r["fitness"] == original["fitness"]
    trained = [r for r in records if r["reused_from"] is None and r["status"] != "invalid"]
    assert len(calls) == len(trained) == len(records) - len(reused)


def test_final_training_of_a_plan_with_a_frozen_prefix_uses_the_cache(tiny_cnn):
    from biotune.runner.final import final_training_run
    from biotune.training import evaluate

    partition = partition_blocks(tiny_cnn)
    bench = Workbench(
        LoadedModel(tiny_cnn, "tiny", 8, (0.5,) * 3, (0.5,) * 3, "random"), partition, _splits()
    )
    plan = _plan(partition.names, 2)
    run = final_training_run(bench, plan, TRAIN, seed=2)
    model, plain = train_plan(
        tiny_cnn, partition, plan, bench.splits.train, bench.splits.val, TRAIN, seed=2
    )
    test = evaluate(model, bench.splits.test, TRAIN.eval_batch_size)
    assert run.cached_prefix == 2
    assert run.val_balanced == plain.val.balanced
    assert (run.test_top1, run.test_balanced) == (test.top1, test.balanced)
    assert run.train_images == plain.train_images
    full = final_training_run(bench, FineTunePlan.full(partition.names), TRAIN, seed=2)
    assert full.cached_prefix == 0
