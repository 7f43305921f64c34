"""Device, precision, channels_last and augmentation: defaults that change nothing on the CPU,
GPU choices checked with mocks (no GPU here), and configurations stored before they existed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data

from biotune import training
from biotune.blocks import partition_blocks
from biotune.core.plan import FineTunePlan
from biotune.data import random_resized_crop_flip
from biotune.errors import BioTuneError
from biotune.features import FeatureCache, block_chain, train_plan_fast
from biotune.presets import default, paper
from biotune.runner.config import SearchConfig
from biotune.training import (
    DEVICE_ENV,
    TrainConfig,
    autocast_dtype,
    default_device,
    loader_options,
    resolve_device,
    train_plan,
)

TRAIN = TrainConfig(epochs=2, patience=5, batch_size=16, eval_batch_size=32, base_lr=1e-2)
CPU = torch.device("cpu")


def _train(config: TrainConfig, seed: int = 0):  # noqa: ANN202
    torch.manual_seed(0)
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    trained, result = train_plan(
        model,
        partition,
        FineTunePlan.full(partition.names),
        make_tiny_data(64),
        make_tiny_data(32, seed=1),
        config,
        seed,
        device=CPU,
    )
    return trained, result


# ------------------------------------------------------------------------------ configurations


def test_a_config_stored_with_amp_loads_as_its_precision():
    old = {
        "epochs": 8,
        "patience": 2,
        "batch_size": 64,
        "eval_batch_size": 256,
        "base_lr": 0.001,
        "weight_decay": 0.0,
        "optimizer": "adam",
        "scheduler": "cosine",
        "metric": "balanced",
        "frozen_eval": True,
    }
    assert TrainConfig(**old, amp=True).precision == "auto"
    assert TrainConfig(**old, amp=False).precision == "32"
    assert TrainConfig(**old, amp=False).to_dict() == {**old, "amp": False}


def test_default_configs_are_stored_as_before_so_earlier_runs_resume():
    """config.json, compare rows and benchmark records hash or compare these dicts."""
    for config in (default(), paper()):
        stored = json.dumps(config.to_dict())
        assert '"amp": true' in stored
        for new in ("precision", "augment", "channels_last"):
            assert new not in stored
        assert SearchConfig.from_dict(json.loads(stored)) == config


def test_new_options_are_stored_and_read_back():
    config = TrainConfig(precision="bf16", augment=True, channels_last=True)
    stored = config.to_dict()
    assert stored["precision"] == "bf16" and stored["augment"] and stored["channels_last"]
    assert TrainConfig(**stored) == config


def test_an_unknown_precision_is_refused():
    with pytest.raises(BioTuneError, match="precision must be one of auto, 32, bf16, fp16"):
        TrainConfig(precision="fp8")


# ------------------------------------------------------------------------------------- devices


def test_device_cpu_and_auto_resolve_on_this_machine(monkeypatch):
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU


def test_device_from_the_environment_is_the_default(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert default_device() == CPU
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(BioTuneError, match="unknown device 'tpu'"):
        default_device()


def test_a_gpu_this_machine_lacks_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BioTuneError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(BioTuneError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


def test_command_line_refuses_a_missing_gpu_before_any_work(monkeypatch, capsys):
    from biotune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--plan", "head", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_the_loader_uses_workers_and_pinned_memory_only_on_a_gpu():
    assert loader_options(CPU) == {}
    gpu = loader_options(torch.device("cuda"))
    assert gpu["pin_memory"] is True and gpu["workers"] >= 1


class _Lazy(torch.utils.data.Dataset):
    """The same images read one at a time, as a folder of files is (no ``images`` tensor)."""

    def __init__(self, data) -> None:  # noqa: ANN001
        self.data, self.targets = data, data.targets

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.data.images[i], int(self.targets[i])


def test_loader_workers_serve_every_epoch_and_train_as_in_memory(monkeypatch):
    """With workers (a GPU's ``loader_options``), one loader per split lives for the whole
    training instead of starting its worker processes every epoch, and the batches are the
    in-memory ones."""
    built = []

    class Counting(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            built.append(kwargs["persistent_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "DataLoader", Counting)
    monkeypatch.setattr(training, "loader_options", lambda device: {"workers": 1})
    config = TrainConfig(**{**TRAIN.to_dict(), "epochs": 3})
    partition = partition_blocks(make_tiny_cnn())
    runs = []
    for wrap in (lambda d: d, _Lazy):
        torch.manual_seed(0)
        model = make_tiny_cnn()
        train, val = wrap(make_tiny_data(40)), wrap(make_tiny_data(24, seed=1))
        plan = FineTunePlan.full(partition.names)
        runs.append(train_plan(model, partition, plan, train, val, config, seed=2)[1])
    assert runs[1].epochs_run == 3 and built == [True, True]  # train and val, not one per epoch
    assert runs[1].history == runs[0].history


# ----------------------------------------------------------------------------------- precision


def test_auto_precision_is_float32_on_the_cpu_and_32_trains_identically():
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CPU, "32") is None
    _, auto = _train(TRAIN)
    _, fp32 = _train(TrainConfig(**{**TRAIN.to_dict(), "amp": False}))
    assert fp32.history == auto.history


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float16)],
)
def test_auto_precision_on_a_gpu_is_bf16_only_where_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # is_bf16_supported() also counts emulation; it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), "auto") is expected
    assert autocast_dtype(torch.device("cuda"), "32") is None
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16


def test_bf16_runs_on_the_cpu_and_fp16_is_refused_there():
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    _, result = _train(TrainConfig(**{**TRAIN.to_dict(), "precision": "bf16"}))
    assert result.status == "ok"
    with pytest.raises(BioTuneError, match="fp16 needs a CUDA GPU; on the CPU"):
        autocast_dtype(CPU, "fp16")
    # MPS has no loss scaling here either: refused rather than silently underflowing.
    with pytest.raises(BioTuneError, match="fp16 needs a CUDA GPU; on mps"):
        autocast_dtype(torch.device("mps"), "fp16")


def test_worker_gpus_follow_the_chosen_device_and_the_visible_list(monkeypatch):
    """Process-pool workers spread over GPUs only when the device is CUDA; ``cuda:N`` is one
    GPU; ids are read through the driver's own CUDA_VISIBLE_DEVICES."""
    from biotune.runner.executors import _gpu_ids
    from biotune.training import DEVICE_ENV

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert _gpu_ids() == []
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert _gpu_ids() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _gpu_ids() == ["2", "3"]
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    assert _gpu_ids() == ["3"]


def test_reinit_head_draws_one_head_per_seed_and_leaves_the_generator_alone():
    from biotune.training import reinit_head

    model = make_tiny_cnn()
    partition = partition_blocks(model)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    reinit_head(model, partition, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    expected = torch.nn.Linear(16, 3)  # the tiny CNN's head, drawn the way reset draws it
    head = model[-1]
    assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_a_gpu_trains_with_loss_scaling():
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    config = TrainConfig(**{**TRAIN.to_dict(), "precision": "fp16"})
    _, result = train_plan(
        model,
        partition,
        FineTunePlan.full(partition.names),
        make_tiny_data(64),
        make_tiny_data(32, seed=1),
        config,
        device=torch.device("cuda"),
    )
    assert result.status == "ok" and all(h["train_loss"] > 0 for h in result.history)


# ------------------------------------------------------------------------------ channels_last


def test_channels_last_trains_close_to_the_default_but_is_opt_in():
    plain, default_run = _train(TRAIN)
    model, last = _train(TrainConfig(**{**TRAIN.to_dict(), "channels_last": True}))
    # The option is applied: the convolutions trained in channels-last memory, and only then.
    conv = model[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain[1][0].weight.is_contiguous()
    assert [h["val_top1"] for h in last.history] == pytest.approx(
        [h["val_top1"] for h in default_run.history], abs=0.1
    )
    assert TRAIN.channels_last is False


# -------------------------------------------------------------------------------- augmentation


def test_augmentation_crops_and_flips_reproducibly():
    images = torch.randn(6, 3, 16, 16)
    a = random_resized_crop_flip(images, torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(images, torch.Generator().manual_seed(1))
    c = random_resized_crop_flip(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, images)


def test_an_augmented_training_is_reproducible_and_differs_from_the_plain_one():
    augmented = TrainConfig(**{**TRAIN.to_dict(), "augment": True})
    _, one = _train(augmented, seed=3)
    _, two = _train(augmented, seed=3)
    _, plain = _train(TRAIN, seed=3)
    assert one.history == two.history and one.history != plain.history


def test_augmentation_turns_the_feature_cache_off():
    model = make_tiny_cnn().eval()
    partition = partition_blocks(model)
    train, val = make_tiny_data(64), make_tiny_data(32, seed=1)
    stages = block_chain(model, partition, train.images[:2])
    cache = FeatureCache(model, stages, 2**26, 32)
    plan = FineTunePlan.head_only(partition.names)
    _, _, cached = train_plan_fast(model, partition, plan, train, val, TRAIN, cache=cache)
    augmented = TrainConfig(**{**TRAIN.to_dict(), "augment": True})
    _, _, uncached = train_plan_fast(model, partition, plan, train, val, augmented, cache=cache)
    assert cached > 0 and uncached == 0


def test_the_offline_default_still_picks_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.default_device() == CPU
