"""Each baseline does what makes it that baseline, on a tiny CNN and in-memory data."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from biotune.baselines import (
    METHODS,
    AutoRGNHooks,
    SPRegularizer,
    measure_rgn,
    per_tensor_groups,
    run_baseline,
    schedule_factor,
    select_lr,
)
from biotune.blocks import partition_blocks
from biotune.core.plan import FineTunePlan
from biotune.data import DatasetSplits, TensorImageDataset
from biotune.errors import BioTuneError
from biotune.freezing import apply_plan
from biotune.models import LoadedModel
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig, batches, fine_tune, reinit_head

CONFIG = TrainConfig(epochs=2, patience=2, batch_size=32, eval_batch_size=64, base_lr=1e-2)


def colour_data(n: int, seed: int, classes: int = 3, size: int = 8) -> TensorImageDataset:
    """Class c is brighter on channel c: easy for a linear probe on pooled features."""
    g = torch.Generator().manual_seed(seed)
    targets = np.arange(n) % classes
    images = torch.randn(n, 3, size, size, generator=g) * 0.5
    for i, c in enumerate(targets):
        images[i, c] += 1.0
    return TensorImageDataset(images, targets)


def tiny_cnn(depthwise: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = nn.Conv2d(8, 8, 3, padding=1, groups=8) if depthwise else nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(middle, nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(16, 3),
    )
    with torch.no_grad():  # like pretrained BatchNorm: no tensor is exactly zero
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.normal_(0.0, 0.1)
    return model


def make_bench(depthwise: bool = False) -> Workbench:
    model = tiny_cnn(depthwise)
    splits = DatasetSplits(
        "colours", ["r", "g", "b"], colour_data(96, 0), colour_data(48, 1), colour_data(48, 2), 8
    )
    loaded = LoadedModel(model, "tiny", 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "random init")
    return Workbench(loaded, partition_blocks(model), splits)


@pytest.fixture
def bench() -> Workbench:
    return make_bench()


def _head_names(bench: Workbench) -> set[str]:
    return set(bench.partition[bench.partition.names[-1]].param_names)


def _changed(before: nn.Module, after: nn.Module) -> dict[str, bool]:
    ref = dict(before.named_parameters())
    return {n: not torch.equal(p.detach(), ref[n].detach()) for n, p in after.named_parameters()}


def test_registry_names_every_baseline_of_the_paper_and_the_practitioners_recipes():
    assert {"full", "linear", "autorgn", "lora", "l2sp", "l1sp", "plan"} <= set(METHODS)
    assert {"llrd", "lpft"} <= set(METHODS)


def test_linear_probing_changes_only_the_head(bench):
    run = run_baseline("linear", bench, CONFIG, seed=0)
    changed = _changed(bench.model, run.model)
    head = _head_names(bench)
    assert all(changed[n] for n in head)
    assert not any(v for n, v in changed.items() if n not in head)
    for name, buf in bench.model.named_buffers():  # frozen BatchNorm statistics stay put too
        assert torch.equal(buf, dict(run.model.named_buffers())[name]), name
    assert run.trainable_params == sum(p.numel() for p in bench.model[4].parameters())


def test_full_fine_tuning_changes_every_tensor_and_leaves_the_bench_alone(bench):
    original = copy.deepcopy(bench.model)
    run = run_baseline("full", bench, CONFIG, seed=0)
    assert all(_changed(bench.model, run.model).values())
    assert not any(_changed(original, bench.model).values())
    assert run.trainable_params == sum(p.numel() for p in bench.model.parameters())


# --------------------------------------------------------------------------------------------
# AutoRGN


def _autorgn_setup(bench: Workbench, config: TrainConfig, rgn_batches: int = 2):
    model = copy.deepcopy(bench.model)
    reinit_head(model, bench.partition, 0)
    groups = apply_plan(
        model, bench.partition, FineTunePlan.full(bench.partition.names), config.base_lr
    )
    return model, per_tensor_groups(model, groups), AutoRGNHooks(config, rgn_batches)


def _expected_rgn(model: nn.Module, data, config: TrainConfig, count: int) -> dict[str, float]:
    """||grad|| / ||w|| per tensor, averaged over the first ``count`` unshuffled batches."""
    model = copy.deepcopy(model).train()
    sums: dict[str, float] = {n: 0.0 for n, _ in model.named_parameters()}
    for k, (x, y) in enumerate(batches(data, config.batch_size)):
        if k == count:
            break
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            sums[n] += float(p.grad.norm())
    return {n: sums[n] / count / float(p.detach().norm()) for n, p in model.named_parameters()}


def test_autorgn_learning_rates_follow_measured_relative_gradient_norms(bench):
    config = replace(CONFIG, epochs=3, patience=3)
    model, groups, hooks = _autorgn_setup(bench, config)
    expected = _expected_rgn(model, bench.splits.train, config, 2)
    fine_tune(model, groups, bench.splits.train, bench.splits.val, config, seed=0, hooks=hooks)

    assert [h["epoch"] for h in hooks.history] == [0, 1, 2]
    first = hooks.history[0]
    for name, value in expected.items():
        assert first["rgn"][name] == pytest.approx(value, rel=1e-4)
    for h in hooks.history:
        top = max(h["rgn"].values())
        factor = schedule_factor(config, h["epoch"])
        for name, rgn in h["rgn"].items():
            assert h["ratio"][name] == pytest.approx(rgn / top)
            assert h["lr"][name] == pytest.approx(config.base_lr * factor * rgn / top)
    # the tensor with the largest RGN gets the base lr itself; the others get less, unevenly
    assert max(first["lr"].values()) == pytest.approx(config.base_lr)
    assert min(first["ratio"].values()) < 0.5
    # recomputed every epoch from the current weights, not fixed once
    assert first["ratio"] != hooks.history[1]["ratio"]
    assert hooks.history[1]["ratio"] != hooks.history[2]["ratio"]


def test_autorgn_learning_rates_reach_the_optimizer(bench):
    """Adam's first step moves each tensor by about its lr: the per-tensor rates are applied."""
    n = len(bench.splits.train)
    config = replace(CONFIG, epochs=1, batch_size=n, scheduler="none")
    model, groups, hooks = _autorgn_setup(bench, config, rgn_batches=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fine_tune(model, groups, bench.splits.train, bench.splits.val, config, seed=0, hooks=hooks)
    lrs = hooks.history[0]["lr"]
    assert len(set(round(v, 12) for v in lrs.values())) > 1
    for name, p in model.named_parameters():
        if lrs[name] < 1e-3 * config.base_lr:
            continue  # e.g. a conv bias before BatchNorm: its gradient is ~0, near Adam's eps
        step = float((p.detach() - before[name]).abs().max())
        assert step == pytest.approx(lrs[name], rel=0.05), name


def test_measuring_rgn_trains_nothing(bench):
    model = copy.deepcopy(bench.model).train()
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    rgn = measure_rgn(model, params, batches(bench.splits.train, 16), 3)
    assert all(r > 0 and math.isfinite(r) for r in rgn)
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------------------------
# L2-SP and L1-SP


@pytest.mark.parametrize("norm", [2, 1])
def test_sp_penalty_is_zero_at_the_start_and_pulls_back_toward_it(bench, norm):
    model = copy.deepcopy(bench.model)
    reg = SPRegularizer.for_model(model, bench.partition, alpha=0.5, beta=0.0, norm=norm)
    assert float(reg.penalty(model).detach()) == 0.0

    torch.manual_seed(1)
    noise = {}
    with torch.no_grad():
        for p in reg.pretrained:
            noise[p] = torch.randn_like(p) * 0.1
            p.add_(noise[p])
    value = float(reg.penalty(model).detach())
    expected = (
        0.25 * sum(float(d.pow(2).sum()) for d in noise.values())
        if norm == 2
        else 0.5 * sum(float(d.abs().sum()) for d in noise.values())
    )
    assert value == pytest.approx(expected, rel=1e-5)

    def distance() -> float:
        pairs = zip(reg.pretrained, reg.anchors, strict=True)
        return sum(float((p.detach() - w0).pow(2).sum()) for p, w0 in pairs)

    before = distance()
    reg.penalty(model).backward()
    with torch.no_grad():
        for p in reg.pretrained:
            p.sub_(0.01 * p.grad)
    assert distance() < before


def test_sp_penalty_decays_the_new_head_toward_zero(bench):
    model = copy.deepcopy(bench.model)
    reg = SPRegularizer.for_model(model, bench.partition, alpha=0.0, beta=0.2)
    head = bench.partition.parameters(model, bench.partition.names[-1])
    assert float(reg.penalty(model).detach()) == pytest.approx(
        0.1 * sum(float(p.detach().pow(2).sum()) for p in head), rel=1e-5
    )
    assert all(not any(p is h for h in head) for p in reg.pretrained)


def test_l2sp_training_stays_closer_to_the_pretrained_weights_than_full(bench):
    config = replace(CONFIG, epochs=2)
    full = run_baseline("full", bench, config, seed=0)
    l2sp = run_baseline("l2sp", bench, config, seed=0, l2sp_alpha=50.0)
    body = [n for n, _ in bench.model.named_parameters() if n not in _head_names(bench)]
    start = dict(bench.model.named_parameters())

    def distance(model: nn.Module) -> float:
        params = dict(model.named_parameters())
        return sum(float((params[n] - start[n]).detach().pow(2).sum()) for n in body)

    assert distance(l2sp.model) < 0.7 * distance(full.model)
    assert l2sp.info == {"alpha": 50.0, "beta": 0.01, "norm": 2}


# --------------------------------------------------------------------------------------------
# LoRA


def test_lora_leaves_base_weights_untouched_and_trains_adapters_and_head():
    bench = make_bench(depthwise=True)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3"):
        run = run_baseline("lora", bench, CONFIG, seed=0, lora_rank=4, lora_alpha=8)
    assert run.info["skipped"] == ["1.0"]
    assert run.info["adapted"] == 2

    params = dict(run.model.named_parameters())
    head = _head_names(bench)
    fresh_head = copy.deepcopy(bench.model)
    reinit_head(fresh_head, bench.partition, 0)
    for name, original in bench.model.named_parameters():
        wrapped = [
            v
            for k, v in params.items()
            if k.endswith(
                name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            )
            or k.endswith("." + name)
        ]
        assert wrapped, name
        if name in head:
            assert not torch.equal(wrapped[0], dict(fresh_head.named_parameters())[name])
        else:
            assert torch.equal(wrapped[0], original), name  # bit-identical base weights
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    # the adapters moved off their zero start
    assert lora_b and all(float(p.detach().abs().sum()) > 0 for p in lora_b)
    trainable = sum(p.numel() for n, p in params.items() if "lora_" in n) + sum(
        p.numel() for p in bench.model[4].parameters()
    )
    assert run.trainable_params == trainable
    assert not any("1.0.lora" in n or "1.0.base_layer" in n for n in params)


def test_lora_without_grouped_convolutions_skips_nothing(bench):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = run_baseline("lora", bench, replace(CONFIG, epochs=1), seed=0, lora_rank=2)
    assert run.info["skipped"] == [] and run.info["adapted"] == 3


# --------------------------------------------------------------------------------------------
# the shared protocol


def test_select_lr_chooses_by_validation_and_records_every_grid_value(bench):
    grid = (1e-6, 3e-2, 1e-1)
    selection = select_lr("full", bench, CONFIG, grid=grid, seed=0)
    val = {float(k): v for k, v in selection.val.items()}
    assert set(val) == set(grid)
    assert selection.lr == max(grid, key=lambda lr: (val[lr], -grid.index(lr)))
    assert selection.lr != 1e-6 and val[selection.lr] > val[1e-6]
    assert selection.best.result.val.balanced == val[selection.lr]
    assert selection.options == {} and selection.runs == len(grid)


def test_a_plan_trains_like_a_baseline(bench):
    names = bench.partition.names
    plan = FineTunePlan.head_only(names)
    a = run_baseline("plan", bench, CONFIG, seed=3, plan=plan)
    b = run_baseline("linear", bench, CONFIG, seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_unknown_method_or_option_is_a_clear_error(bench):
    with pytest.raises(BioTuneError, match="unknown method 'adapterfusion'"):
        run_baseline("adapterfusion", bench, CONFIG)
    with pytest.raises(BioTuneError, match="takes no option lora_rank"):
        run_baseline("full", bench, CONFIG, lora_rank=4)


# --------------------------------------------------------------------------------------------
# layer-wise lr decay and LP-FT


def test_llrd_gives_each_block_base_times_decay_to_its_depth_from_the_head(bench):
    names = bench.partition.names
    plan = FineTunePlan.layer_decay(names, 0.5)
    model = copy.deepcopy(bench.model)
    groups = apply_plan(model, bench.partition, plan, 1e-2)
    with_params = [n for n in names if bench.partition.parameters(model, n)]
    assert [g["name"] for g in groups] == with_params
    last = len(names) - 1
    for g in groups:
        assert g["lr"] == 1e-2 * 0.5 ** (last - names.index(g["name"])), g["name"]
    assert groups[-1]["lr"] == 1e-2  # the head at the base lr
    run = run_baseline("llrd", bench, CONFIG, seed=0, llrd_decay=0.5)
    assert run.info["plan"] == plan.to_dict()
    assert all(_changed(bench.model, run.model).values())  # every block trains


def test_llrd_decay_is_tuned_jointly_with_the_lr(bench):
    selection = select_lr("llrd", bench, CONFIG, grid=(1e-3, 3e-2), seed=0, llrd_decays=(0.3, 0.9))
    assert selection.runs == 4
    assert set(selection.val) == {
        "0.001, llrd_decay 0.3",
        "0.03, llrd_decay 0.3",
        "0.001, llrd_decay 0.9",
        "0.03, llrd_decay 0.9",
    }
    best = max(selection.val.values())
    label = next(k for k, v in selection.val.items() if v == best)
    assert label.startswith(f"{selection.lr:g}, llrd_decay {selection.options['llrd_decay']:g}")
    with pytest.raises(BioTuneError, match="tuning grid"):
        run_baseline("llrd", bench, CONFIG, llrd_decays=(0.5,))
    with pytest.raises(BioTuneError, match=r"must lie in \(0, 1\]"):
        FineTunePlan.layer_decay(bench.partition.names, 1.5)


def test_lpft_first_phase_changes_only_the_head_then_every_block(bench, monkeypatch):
    import biotune.baselines as baselines_module

    seen = {}
    real = baselines_module.fine_tune

    def second_phase(model, groups, *args, **kwargs):
        seen["before"] = copy.deepcopy(model)
        seen["groups"] = [g["name"] for g in groups]
        return real(model, groups, *args, **kwargs)

    monkeypatch.setattr(baselines_module, "fine_tune", second_phase)
    config = replace(CONFIG, epochs=3, patience=3)
    run = run_baseline("lpft", bench, config, seed=0, lpft_head_lr=5e-2, lpft_head_share=1 / 3)
    head = _head_names(bench)
    after_probe = _changed(bench.model, seen["before"])
    assert all(after_probe[n] for n in head)
    assert not any(v for n, v in after_probe.items() if n not in head)
    for name, buf in bench.model.named_buffers():  # the frozen backbone's statistics too
        assert torch.equal(buf, dict(seen["before"].named_buffers())[name]), name
    assert seen["groups"] == [
        n for n in bench.partition.names if bench.partition.parameters(bench.model, n)
    ]
    assert all(_changed(seen["before"], run.model).values())  # phase 2 trains every tensor
    first, second = run.info["phases"]
    assert (first["epochs"], second["epochs"]) == (1, 2) and first["lr"] == 5e-2
    assert run.result.epochs_run == first["epochs_run"] + second["epochs_run"]
    assert [h["epoch"] for h in run.result.history] == list(range(1, run.result.epochs_run + 1))
    assert run.result.train_images == first["train_images"] + second["train_images"]


def test_lpft_keeps_user_frozen_parameters_frozen(bench):
    bench.model[2][0].bias.requires_grad_(False)
    run = run_baseline("lpft", bench, replace(CONFIG, epochs=2), seed=0)
    trained = dict(run.model.named_parameters())
    assert torch.equal(trained["2.0.bias"], bench.model[2][0].bias)
    assert not trained["2.0.bias"].requires_grad
    assert not torch.equal(trained["2.0.weight"], bench.model[2][0].weight)


def test_lpft_needs_an_epoch_per_phase(bench):
    with pytest.raises(BioTuneError, match="at least 2 epochs"):
        run_baseline("lpft", bench, replace(CONFIG, epochs=1), seed=0)
