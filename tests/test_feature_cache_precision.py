"""The feature cache at real sizes: features kept in the precision the frozen prefix computes
them in (half the memory under bfloat16, and what uncached training feeds the suffix), and one
line that says what was cached and what was refused."""

from __future__ import annotations

import torch
from conftest import make_tiny_cnn, make_tiny_data

from biotune.blocks import partition_blocks
from biotune.core.plan import BlockSetting, FineTunePlan
from biotune.features import FeatureCache, batch_sizes_for, block_chain, train_plan_cached
from biotune.training import TrainConfig, train_plan


def _plan(names: tuple[str, ...], frozen: int) -> FineTunePlan:
    return FineTunePlan(tuple(BlockSetting(n, i >= frozen, 1.0) for i, n in enumerate(names)))


def test_bf16_features_are_kept_in_bf16_and_train_like_uncached_bf16_training() -> None:
    torch.manual_seed(0)
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    train, val = make_tiny_data(40, size=16), make_tiny_data(27, size=16, seed=1)
    config = TrainConfig(epochs=2, patience=5, batch_size=16, eval_batch_size=10, precision="bf16")
    stages = block_chain(model, partition, val.images[:2])
    bf16 = FeatureCache(model, stages, 10**9, config.eval_batch_size, precision="bf16")
    fp32 = FeatureCache(model, stages, 10**9, config.eval_batch_size)
    train_f = bf16.features("train", train, 2, batch_sizes_for(len(train), 16))
    val_f = bf16.features("val", val, 2)
    assert train_f.images.dtype == val_f.images.dtype == torch.bfloat16
    assert 2 * bf16.entry_bytes(train, 2) == fp32.entry_bytes(train, 2)
    plan = _plan(partition.names, 2)
    m_plain, plain = train_plan(model, partition, plan, train, val, config, seed=1)
    m_cached, cached = train_plan_cached(model, partition, plan, train_f, val_f, config, seed=1)
    assert cached.history == plain.history
    for (name, a), b in zip(
        m_plain.state_dict().items(), m_cached.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_the_summary_says_what_was_cached_and_what_was_refused() -> None:
    torch.manual_seed(0)
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    stages = block_chain(model, partition)
    data = make_tiny_data(40)
    one_entry = FeatureCache(model, stages, 10**9).entry_bytes(data, 1)
    cache = FeatureCache(model, stages, int(one_entry * 1.5))
    cache.features("a", data, 1)
    cache.features("b", data, 1)  # evicts "a"
    assert cache.features("c", make_tiny_data(400), 1) is None
    line = cache.summary()
    assert "2 entries built, 1 evicted" in line and "torch.float32 on cpu" in line
    assert "1 refused" in line and "over the budget" in line and "\n" not in line
    assert "refused" not in FeatureCache(model, stages, 10**9).summary()
