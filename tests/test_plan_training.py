"""Plans: genome decoding, JSON round trip, and what applying a plan does to training."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from biotune.blocks import partition_blocks
from biotune.core.plan import (
    BlockSetting,
    FineTunePlan,
    decode_genome,
    encode_plan,
    genome_is_valid,
)
from biotune.errors import BioTuneError
from biotune.freezing import apply_plan
from biotune.training import TrainConfig, accuracy, count_parameters, fine_tune, train_plan

BLOCKS = {"stem": ["0"], "mid": ["1"], "top": ["2"], "head": ["4"]}


def _partition(model):
    return partition_blocks(model, BLOCKS)


def test_decode_genome_trains_blocks_above_threshold_at_log_scaled_lr():
    names = ["stem", "mid", "top", "head"]
    plan = decode_genome([0.2, 0.5, 1.0, 0.75, 0.4], names)
    assert plan.trained == ("mid", "top", "head")
    assert plan.setting("stem").train is False
    assert plan.setting("mid").lr_mult == pytest.approx(1.0)
    assert plan.setting("top").lr_mult == pytest.approx(10.0)
    assert plan.setting("head").lr_mult == pytest.approx(10**0.5)
    assert plan.frozen_prefix == 1


def test_gene_equal_to_threshold_is_frozen_and_no_selection_is_invalid():
    assert not genome_is_valid(np.array([0.3, 0.3, 0.3]))
    assert genome_is_valid(np.array([0.3, 0.31, 0.3]))
    plan = decode_genome([0.3, 0.0, 0.3], ["a", "b"])
    assert plan.trained == ()


def test_decode_genome_rejects_wrong_length():
    with pytest.raises(BioTuneError, match="needs 4 genes"):
        decode_genome([0.1, 0.2], ["a", "b", "c"])


def test_encode_plan_inverts_decode():
    rng = np.random.default_rng(0)
    names = [f"b{i}" for i in range(6)]
    for _ in range(50):
        genes = rng.uniform(size=7)
        if not genome_is_valid(genes):
            continue
        plan = decode_genome(genes, names)
        again = decode_genome(encode_plan(plan), names)
        assert again.trained == plan.trained
        for a, b in zip(plan.blocks, again.blocks, strict=True):
            assert a.lr_mult == pytest.approx(b.lr_mult)


def test_plan_json_round_trip(tmp_path):
    plan = FineTunePlan((BlockSetting("a", False), BlockSetting("b", True, 2.5)))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert FineTunePlan.load(path) == plan
    assert plan.key() == FineTunePlan.load(path).key()


def test_malformed_plan_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BioTuneError, match="bad.json"):
        FineTunePlan.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"layers": []}))
    with pytest.raises(BioTuneError, match="wrong.json"):
        FineTunePlan.load(wrong)


def test_plan_for_another_model_is_refused(tiny_cnn):
    plan = FineTunePlan.full(["x", "y"])
    with pytest.raises(BioTuneError, match="does not fit"):
        plan.check_fits(_partition(tiny_cnn))


def test_param_groups_carry_base_lr_times_multiplier(tiny_cnn):
    partition = _partition(tiny_cnn)
    plan = decode_genome([0.1, 0.9, 0.6, 0.5, 0.3], partition.names)
    groups = apply_plan(tiny_cnn, partition, plan, base_lr=1e-3)
    assert [g["name"] for g in groups] == ["mid", "top", "head"]
    for g in groups:
        mult = plan.setting(g["name"]).lr_mult
        assert g["lr"] == pytest.approx(1e-3 * mult)
        assert all(p.requires_grad for p in g["params"])
    assert not any(p.requires_grad for p in partition.parameters(tiny_cnn, "stem"))
    opt = torch.optim.Adam(groups)
    assert [pg["lr"] for pg in opt.param_groups] == [g["lr"] for g in groups]


def test_frozen_blocks_keep_weights_and_batchnorm_statistics(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    plan = FineTunePlan(
        (
            BlockSetting("stem", False),
            BlockSetting("mid", True, 3.0),
            BlockSetting("top", False),
            BlockSetting("head", True, 0.5),
        )
    )
    before = copy.deepcopy(tiny_cnn.state_dict())
    groups = apply_plan(tiny_cnn, partition, plan, base_lr=1e-2)
    opt = torch.optim.Adam(groups)
    tiny_cnn.train()
    x, y = tiny_data.images[:32], torch.as_tensor(tiny_data.targets[:32])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tiny_cnn(x), y).backward()
        opt.step()
    after = tiny_cnn.state_dict()
    for name, value in after.items():
        block = name.split(".")[0]
        if block in ("0", "2"):  # frozen: weights and BN running stats bit-identical
            assert torch.equal(value, before[name]), name
    assert not torch.equal(after["1.0.weight"], before["1.0.weight"])
    assert not torch.equal(after["1.1.running_mean"], before["1.1.running_mean"])
    assert not torch.equal(after["4.weight"], before["4.weight"])
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-2)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-3)


def test_paper_behaviour_switch_lets_frozen_batchnorm_drift(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    plan = FineTunePlan.head_only(partition.names)
    before = tiny_cnn[0][1].running_mean.clone()
    apply_plan(tiny_cnn, partition, plan, 1e-3, frozen_eval=False)
    tiny_cnn.train()
    tiny_cnn(tiny_data.images[:16])
    assert not torch.equal(before, tiny_cnn[0][1].running_mean)


def test_applying_a_new_plan_undoes_the_old_one(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    apply_plan(tiny_cnn, partition, FineTunePlan.head_only(partition.names), 1e-3)
    apply_plan(tiny_cnn, partition, FineTunePlan.full(partition.names), 1e-3)
    before = tiny_cnn[0][1].running_mean.clone()
    tiny_cnn.train()
    tiny_cnn(tiny_data.images[:16])
    assert not torch.equal(before, tiny_cnn[0][1].running_mean)
    assert all(p.requires_grad for p in tiny_cnn.parameters())


def test_accuracy_and_balanced_accuracy():
    top1, balanced = accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 1]))
    assert top1 == 1.0 and balanced == 1.0
    top1, balanced = accuracy(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    assert top1 == 0.75 and balanced == 0.5


def test_training_is_deterministic_and_learns(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    plan = FineTunePlan.full(partition.names)
    config = TrainConfig(epochs=4, patience=4, batch_size=16, base_lr=1e-2)
    m1, r1 = train_plan(tiny_cnn, partition, plan, tiny_data, tiny_data, config, seed=3)
    m2, r2 = train_plan(tiny_cnn, partition, plan, tiny_data, tiny_data, config, seed=3)
    assert r1.val.balanced == r2.val.balanced
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert r1.val.top1 > 0.6
    assert r1.train_images == len(tiny_data) * r1.epochs_run
    _, r3 = train_plan(tiny_cnn, partition, plan, tiny_data, tiny_data, config, seed=4)
    assert [h["train_loss"] for h in r3.history] != [h["train_loss"] for h in r1.history]


def test_early_stopping_restores_the_best_epoch(monkeypatch, tiny_cnn, tiny_data):
    """Validation peaks at epoch 2 and the later epochs are strictly worse: the returned model
    holds epoch 2's weights, not the last epoch's."""
    import biotune.training as training

    scores = iter([0.5, 0.9, 0.6, 0.7])
    weights: list[dict[str, torch.Tensor]] = []

    def scripted(model, *args, **kwargs):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        value = next(scores)
        return training.Metrics(value, value)

    monkeypatch.setattr(training, "evaluate", scripted)
    partition = _partition(tiny_cnn)
    config = TrainConfig(epochs=4, patience=2, batch_size=16, base_lr=0.1, optimizer="sgd")
    model, result = train_plan(
        tiny_cnn, partition, FineTunePlan.full(partition.names), tiny_data, tiny_data, config
    )
    assert result.best_epoch == 2 and result.epochs_run == 4 and result.val.balanced == 0.9
    restored = model.state_dict()
    assert all(torch.equal(restored[k], weights[1][k]) for k in restored)
    assert not all(torch.equal(restored[k], weights[-1][k]) for k in restored)


def test_likelihood_metric_selects_the_epoch_of_lowest_validation_loss(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    config = TrainConfig(
        epochs=5, patience=5, batch_size=16, base_lr=0.3, optimizer="sgd", metric="likelihood"
    )
    _, result = train_plan(
        tiny_cnn, partition, FineTunePlan.full(partition.names), tiny_data, tiny_data, config
    )
    losses = [h["val_loss"] for h in result.history]
    assert [h["val_likelihood"] for h in result.history] == pytest.approx(np.exp(-np.array(losses)))
    assert result.val.loss == pytest.approx(min(losses))
    assert result.val.get("likelihood") == pytest.approx(np.exp(-min(losses)))


def test_diverging_loss_is_reported_not_raised(tiny_cnn, tiny_data):
    partition = _partition(tiny_cnn)
    plan = FineTunePlan.full(partition.names)
    with torch.no_grad():
        tiny_cnn[4].weight.fill_(float("nan"))
    groups = apply_plan(tiny_cnn, partition, plan, 1e-3)
    result = fine_tune(tiny_cnn, groups, tiny_data, tiny_data, TrainConfig(epochs=2))
    assert result.status == "diverged"
    assert result.val.balanced == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"base_lr": -1.0}, "base_lr"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"patience": -2}, "patience"),
    ],
)
def test_bad_training_settings_are_refused(kwargs, message):
    with pytest.raises(BioTuneError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("patience, expected_epochs", [(1, 2), (2, 3), (3, 4)])
def test_patience_stops_after_that_many_epochs_without_improvement(
    monkeypatch, tiny_cnn, tiny_data, patience, expected_epochs
):
    """The validation metric peaks at epoch 1 and never improves: patience p ends the run after
    p more epochs, and the first epoch (counted from 1) is restored as the best."""
    import biotune.training as training

    scores = iter([0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])

    def scripted(*args, **kwargs):
        value = next(scores)
        return training.Metrics(value, value)

    monkeypatch.setattr(training, "evaluate", scripted)
    partition = _partition(tiny_cnn)
    config = TrainConfig(epochs=8, patience=patience, batch_size=16)
    _, result = train_plan(
        tiny_cnn, partition, FineTunePlan.full(partition.names), tiny_data, tiny_data, config
    )
    assert result.epochs_run == expected_epochs
    assert result.best_epoch == 1
    assert [h["epoch"] for h in result.history] == list(range(1, expected_epochs + 1))


@pytest.mark.parametrize("share, expected_epochs", [(0.0, 4), (0.5, 4), (0.75, 6), (1.0, 8)])
def test_no_early_stop_before_the_minimum_share_of_the_schedule(
    monkeypatch, tiny_cnn, tiny_data, share, expected_epochs
):
    """The score peaks at epoch 2 and never improves (the issue's small-validation case):
    patience 2 alone stops at epoch 4 of 8 with half the cosine schedule left; with
    ``min_epochs_share`` s the run goes on to ceil(s x 8) epochs, and epoch 2 is restored."""
    import biotune.training as training

    scores = iter([0.5, 0.9, *[0.8] * 6])

    def scripted(*args, **kwargs):
        value = next(scores)
        return training.Metrics(value, value)

    monkeypatch.setattr(training, "evaluate", scripted)
    partition = _partition(tiny_cnn)
    config = TrainConfig(epochs=8, patience=2, batch_size=16, min_epochs_share=share)
    _, result = train_plan(
        tiny_cnn, partition, FineTunePlan.full(partition.names), tiny_data, tiny_data, config
    )
    assert result.epochs_run == expected_epochs
    assert result.best_epoch == 2


@pytest.mark.parametrize("share", [-0.1, 1.5, True])
def test_a_minimum_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(BioTuneError, match="min_epochs_share must lie in"):
        TrainConfig(min_epochs_share=share)


def test_parameters_the_user_froze_stay_frozen_under_any_plan(tiny_cnn, tiny_data):
    """A plan trains whole blocks, but never a parameter the user set requires_grad=False on."""
    fixed = tiny_cnn[0][0].bias  # in the first block, which the full plan trains
    fixed.requires_grad_(False)
    before = fixed.detach().clone()
    partition = _partition(tiny_cnn)
    config = TrainConfig(epochs=2, patience=2, batch_size=16, base_lr=1e-2)
    model, _ = train_plan(
        tiny_cnn, partition, FineTunePlan.full(partition.names), tiny_data, tiny_data, config
    )
    assert torch.equal(model[0][0].bias, before)
    assert not model[0][0].bias.requires_grad
    assert model[0][0].weight.requires_grad
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model, trainable_only=True) == total - fixed.numel()
    # Applying another plan, then the full plan again, still leaves it frozen.
    apply_plan(model, partition, FineTunePlan.head_only(partition.names), 1e-3)
    apply_plan(model, partition, FineTunePlan.full(partition.names), 1e-3)
    assert not model[0][0].bias.requires_grad
