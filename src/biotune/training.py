"""Fine-tune one model: the recipe shared by the search, the final training and every baseline.

Adam (by default) over plain param groups, cosine annealing, early stopping on a validation
metric with the best epoch restored, top-1 and balanced accuracy, a count of the images that
went through training (the search's cost unit), seeded and deterministic on the CPU.

Where it runs: ``default_device()`` (``BIOTUNE_DEVICE``, set by ``--device``, or the GPU if there
is one); in which precision: ``TrainConfig.precision`` (``auto``: float32 on the CPU, bfloat16 on
a GPU that computes it natively, float16 with loss scaling on older GPUs).
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from biotune.blocks import BlockPartition
from biotune.callbacks import emit
from biotune.core.fields import option
from biotune.core.plan import FineTunePlan
from biotune.data import random_resized_crop_flip
from biotune.decoded import DecodedImages
from biotune.errors import BioTuneError
from biotune.freezing import apply_plan

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "none")
#: "likelihood" is exp(-validation cross-entropy), the geometric mean of the probability given to
#: the true class: it moves with every step, where accuracy after a few steps is mostly noise.
METRICS = ("balanced", "top1", "likelihood")
#: "auto": float32 on the CPU; on a CUDA GPU bfloat16 where it computes it natively (compute
#: capability 8.0 and up), else float16 with a GradScaler. "32" is float32 everywhere.
PRECISIONS = ("auto", "32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: The device every training uses unless given one: auto, cpu, cuda, cuda:N or mps (``--device``
#: sets it, so worker processes inherit it).
DEVICE_ENV = "BIOTUNE_DEVICE"
#: On an accelerator, training checks the loss for NaN or inf once per this many steps (and at
#: the end of each epoch) rather than every step, so the host never waits for the device.
FINITE_CHECK_STEPS = 16


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning recipe (defaults: the paper's per-evaluation training).

    ``patience`` p: training stops after p epochs in a row without a new best validation metric
    (the paper's meaning; 0 and 1 both stop at the first such epoch). Runs before 2026-11-30
    waited p + 1 epochs. ``min_epochs_share`` s: no stop before ceil(s x epochs) epochs have run
    (the count goes on meanwhile, so a run out of patience by then stops there); with a cosine
    schedule, a stop at half the epochs leaves the rate at half its start and throws away the
    low-rate epochs where fine-tuning often does best (``stops_early``).

    ``precision`` (``PRECISIONS``) replaced the ``amp`` flag: ``amp=True`` reads as "auto" and
    ``amp=False`` as "32", so stored configurations load. ``augment`` adds random resized crops
    and flips (``data.random_resized_crop_flip``) to the training batches; it needs the images,
    so the feature cache is off for such a training. ``channels_last`` runs convolutions in the
    channels-last memory format: faster on the CPU (1.45x to 1.66x per EfficientNet-Lite0 training
    step at 64 and 32 px, one thread), but its sums round differently, so it is opt-in.
    """

    epochs: int = option(30, flag="--epochs", type="positive_int", help="maximum epochs")
    patience: int = option(
        3,
        flag="--patience",
        type="int",
        help="early stopping: epochs in a row without a new best validation score before stopping",
    )
    min_epochs_share: float = option(
        0.0,
        flag="--min-epochs-share",
        type="fraction",
        metavar="SHARE",
        help="early stopping: no stop before this share of the epochs has run (0.75: 6 of 8), "
        "so that the cosine schedule's low-rate epochs are not thrown away; 0: stop whenever "
        "the patience runs out",
    )
    batch_size: int = option(
        96, flag="--batch-size", type="positive_int", help="training batch size"
    )
    eval_batch_size: int = 64
    base_lr: float = option(
        1e-3,
        flag="--lr",
        type="float",
        help="base learning rate (a block's lr is this times its multiplier)",
    )
    weight_decay: float = 0.0
    optimizer: str = option("adam", flag="--optimizer", choices=OPTIMIZERS, help="optimizer")
    scheduler: str = "cosine"
    metric: str = "balanced"
    frozen_eval: bool = True
    precision: str = option(
        "auto",
        flag="--precision",
        choices=PRECISIONS,
        help="auto: float32 on the CPU; on a GPU bfloat16 where it runs natively (compute "
        "capability 8.0+), else float16 with loss scaling; 32: float32 everywhere",
    )
    augment: bool = False
    channels_last: bool = option(
        False,
        flag="--channels-last",
        help="channels-last memory format: 1.45x to 1.66x faster CPU training steps for "
        "EfficientNet-Lite0, but results differ in float rounding from the default",
    )
    amp: InitVar[bool | None] = None  # before ``precision``: True = "auto", False = "32"

    def __post_init__(self, amp: bool | None) -> None:
        if amp is not None and self.precision == "auto":
            object.__setattr__(self, "precision", "auto" if amp else "32")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise BioTuneError(f"{name} must be a positive integer (got {getattr(self, name)})")
        if self.patience < 0:
            raise BioTuneError(f"patience must be >= 0 (got {self.patience})")
        share = self.min_epochs_share
        if isinstance(share, bool) or not (0 <= share <= 1):
            raise BioTuneError(f"min_epochs_share must lie in [0, 1] (got {share!r})")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise BioTuneError(f"base_lr must be a positive number (got {self.base_lr})")
        if self.weight_decay < 0:
            raise BioTuneError(f"weight_decay must be >= 0 (got {self.weight_decay})")
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("metric", METRICS),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise BioTuneError(
                    f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})"
                )

    def to_dict(self) -> dict[str, Any]:
        """As stored in config.json. Written as before these options existed whenever they say
        what the old fields said (precision "auto"/"32" as ``amp``, no augmentation, no
        channels_last), so earlier run directories, compare rows and benchmark records match."""
        d = asdict(self)
        if d["precision"] in ("auto", "32"):
            d["amp"] = d.pop("precision") == "auto"
        for name in ("augment", "channels_last", "min_epochs_share"):
            if not d[name]:
                del d[name]
        return d


@dataclass
class Metrics:
    top1: float
    balanced: float
    loss: float = float("nan")

    @property
    def likelihood(self) -> float:
        return math.exp(-self.loss)

    def get(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass
class TrainResult:
    """What one fine-tuning run measured; ``val`` is the restored best epoch's.

    Epochs count from 1: ``best_epoch`` 3 of ``epochs_run`` 5 is the third of five epochs
    (0 when no epoch finished).
    """

    val: Metrics
    best_epoch: int
    epochs_run: int
    seconds: float
    train_images: int
    eval_images: int
    status: str = "ok"  # "ok", "diverged" or "pruned"
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainHooks:
    """Extension points for the baselines and for early termination; the defaults do nothing."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term (L2-SP, L1-SP)."""
        return None

    def on_epoch_start(
        self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any
    ) -> None:
        """Called before each epoch (AutoRGN sets per-tensor learning rates here)."""

    def should_stop(self, epoch: int, metric: float) -> bool:
        """Asked after each epoch's validation: True ends the run as "pruned"."""
        return False

    def on_epoch_end(self, epoch: int, record: dict[str, float]) -> None:
        """After each epoch's validation: ``record`` is its history entry plus its seconds."""


class EpochEvents(TrainHooks):
    """Tells ``callbacks`` (``biotune.callbacks``) of each epoch of a training run, as
    ``event(key, epoch)``: ``on_final_epoch(seed, ...)``, ``on_rerank_epoch(rank, ...)``."""

    def __init__(self, callbacks: Sequence[Any], event: str, key: int) -> None:
        self.callbacks = list(callbacks)
        self.event = event
        self.key = key

    def on_epoch_end(self, epoch: int, record: dict[str, float]) -> None:
        emit(self.callbacks, self.event, self.key, record)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``auto`` (a CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps`` as a device; one that this machine lacks is a one-line error."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BioTuneError(f"unknown device {spec!r}; choose from {', '.join(DEVICES)}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BioTuneError(f"device {spec!r}: no CUDA GPU is available here")
        if device.index is not None and device.index >= count:
            raise BioTuneError(
                f"device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BioTuneError(f"device {spec!r}: Apple's MPS backend is not available here")
    elif device.type != "cpu":
        raise BioTuneError(f"unknown device {spec!r}; choose from {', '.join(DEVICES)}")
    return device


def default_device() -> torch.device:
    """``BIOTUNE_DEVICE`` (``--device``) if set, else a CUDA GPU if there is one, else the CPU."""
    return resolve_device(os.environ.get(DEVICE_ENV))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on ``device``, or None for float32.

    "auto" picks bfloat16 only on a GPU that computes it natively (compute capability 8.0 and
    up; ``is_bf16_supported()`` also counts emulation, which is slow), float16 on older GPUs,
    float32 elsewhere. float16 off CUDA is refused: it has no loss scaling there.
    """
    if precision not in PRECISIONS:
        raise BioTuneError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return (
            torch.bfloat16
            if torch.cuda.get_device_capability(device) >= (8, 0)
            else (torch.float16)
        )
    if precision == "fp16" and device.type != "cuda":
        # Loss scaling (GradScaler) runs on CUDA here; without it fp16 gradients underflow.
        where = "the CPU" if device.type == "cpu" else device.type
        raise BioTuneError(f"precision fp16 needs a CUDA GPU; on {where} use bf16 or 32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader workers and pinned memory for a GPU (none on the CPU, where the images of the
    offline datasets are in memory anyway, and none inside a daemon process)."""
    if device.type != "cuda" or multiprocessing.current_process().daemon:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"workers": min(8, max(1, (cores or 2) - 1)), "pin_memory": True}


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums kept on the device (a Python float's precision, so a sum kept there
    equals one taken step by step on the host); float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def finite_check_steps(device: torch.device) -> int:
    """Training steps between checks that the loss is finite. Each check waits for the device;
    the CPU has nothing to wait for, so it checks every step (and stops before a bad step)."""
    return 1 if device.type == "cpu" else FINITE_CHECK_STEPS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accuracy(preds: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Top-1 and balanced accuracy (mean per-class recall over the classes present)."""
    preds = np.asarray(preds)
    targets = np.asarray(targets)
    if targets.size == 0:
        return float("nan"), float("nan")
    top1 = float(np.mean(preds == targets))
    recalls = [float(np.mean(preds[targets == c] == c)) for c in np.unique(targets)]
    return top1, float(np.mean(recalls))


class _Order(Sampler[int]):
    """The order of a loader's next pass, set before each pass (as ``DistributedSampler.set_epoch``
    does), so one loader and its worker processes serve every epoch."""

    def __init__(self, n: int) -> None:
        self.order: list[int] = list(range(n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class BatchReader:
    """Mini-batches of (images, labels); in-memory tensor datasets are sliced directly (fast).

    Both paths visit the items in the same order for a seed and leave the global RNG alone, so a
    dataset read lazily and the same data in memory (or cached features) train identically. A
    dataset with ``by_batch_size`` tables (cached features) serves each batch from the table
    computed at that batch's size. ``workers`` and ``pin_memory`` apply to datasets read lazily
    (``loader_options`` gives them for a device); one reader keeps one loader per dataset and
    batch size, whose workers live until ``close``, rather than starting anew every epoch.
    Images decoded once (``decoded.DecodedImages``) are gathered and normalised on ``device``
    (the CPU if None), so they need no loader and, on a GPU, no host work per batch.
    """

    def __init__(
        self, workers: int = 0, pin_memory: bool = False, device: torch.device | None = None
    ) -> None:
        self.workers = workers
        self.pin_memory = pin_memory
        self.device = device
        self._loaders: dict[tuple[int, int], tuple[DataLoader, _Order]] = {}

    def __call__(
        self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = getattr(dataset, "images", None)
        n = len(dataset)  # type: ignore[arg-type]
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(n)
        )
        if isinstance(images, torch.Tensor):
            labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
            tables = getattr(dataset, "by_batch_size", None) or {}
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                table = tables.get(len(idx), images)
                batch = table[idx.to(table.device)]
                if table.device.type == "cpu" and self.device and self.device.type == "cuda":
                    batch = batch.pin_memory().to(self.device, non_blocking=True)
                yield batch, labels[idx]
            return
        if isinstance(dataset, DecodedImages):
            labels = torch.as_tensor(dataset.targets, dtype=torch.long, device=self.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield dataset.batch(idx, self.device), labels[idx.to(labels.device)]
            return
        loader, sampler = self._loader(dataset, batch_size)
        sampler.order = order.tolist()
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.long)

    def _loader(self, dataset: Dataset, batch_size: int) -> tuple[DataLoader, _Order]:
        key = (id(dataset), batch_size)
        if key not in self._loaders:
            sampler = _Order(len(dataset))  # type: ignore[arg-type]
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                generator=torch.Generator(),
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0,
            )
            self._loaders[key] = (loader, sampler)
        return self._loaders[key]

    def close(self) -> None:
        """Drop the loaders: their worker processes end with them."""
        self._loaders.clear()


def batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of mini-batches over ``dataset`` (``BatchReader``, for a single pass)."""
    reader = BatchReader(workers, pin_memory, device)
    try:
        yield from reader(dataset, batch_size, shuffle, seed)
    finally:
        reader.close()


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (``autocast_dtype``); a disabled one
    for float32, so every forward pass is written the same way."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch moved to ``device``, in the channels-last memory format where asked (4-D only)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | None = None,
    precision: str = "auto",
    channels_last: bool = False,
    read: BatchReader | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Predicted classes, true labels and mean cross-entropy over a dataset (eval mode);
    ``read``: the training's reader, whose loaders stay up between epochs."""
    device = device or device_of(model)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    # Summed on the device, in the float64 a Python float sums in: no host sync per batch.
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
    if read is None:
        passes = batches(dataset, batch_size, device=device, **loader_options(device))
    else:
        passes = read(dataset, batch_size)
    for x, y in passes:
        with autocast(device, precision):
            out = model(to_device(x, device, channels_last))
        y_dev = y.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(out.float(), y_dev, reduction="sum")
        loss_sum += loss.to(loss_sum.dtype)
        preds.append(out.argmax(1))
        labels.append(y)
    model.train(was_training)
    p, t = torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()
    return p, t, float(loss_sum) / max(len(t), 1)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | None = None,
    precision: str = "auto",
    channels_last: bool = False,
    read: BatchReader | None = None,
) -> Metrics:
    preds, targets, loss = predict(
        model, dataset, batch_size, device, precision, channels_last, read
    )
    top1, balanced = accuracy(preds, targets)
    return Metrics(top1, balanced, loss)


def make_optimizer(groups: Sequence[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BioTuneError("nothing to train: every parameter is frozen")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.base_lr, momentum=0.9, weight_decay=config.weight_decay
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.base_lr, weight_decay=config.weight_decay)


def _oom_message(config: TrainConfig) -> str:
    return (
        f"out of memory while training (batch_size={config.batch_size}, "
        f"eval_batch_size={config.eval_batch_size}); lower --batch-size or --image-size, "
        "or use a smaller model"
    )


def fine_tune(
    model: nn.Module,
    param_groups: Sequence[dict[str, Any]],
    train_data: Dataset,
    val_data: Dataset,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train ``param_groups`` of ``model`` with early stopping; the best epoch is restored.

    Parameters outside the groups must already have ``requires_grad=False`` (``apply_plan`` does
    that). Each epoch's shuffling (and augmentation) derives from ``seed``, so a run is
    reproducible on the CPU.
    """
    hooks = hooks or TrainHooks()
    device = device or default_device()
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, config.precision)
    # float16 needs loss scaling (its small gradients underflow); disabled, the scaler is a no-op.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16 and device.type == "cuda")
    read = BatchReader(**loader_options(device), device=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes repeat: tuned kernels pay off
    check_every = finite_check_steps(device)
    optimizer = make_optimizer(param_groups, config)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        if config.scheduler == "cosine"
        else None
    )
    start = time.perf_counter()
    best_metric, best_epoch, best_state = -1.0, 0, None
    best_val = Metrics(0.0, 0.0)
    history: list[dict[str, float]] = []
    train_images = eval_images = 0
    status, since_best, epoch = "ok", 0, -1
    try:
        for epoch in range(config.epochs):
            model.train()
            hooks.on_epoch_start(
                epoch, model, optimizer, lambda: batches(train_data, config.batch_size)
            )
            seen, epoch_start = 0, time.perf_counter()
            loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
            finite = torch.ones((), dtype=torch.bool, device=device)
            epoch_seed = seed * 1000 + epoch
            # Its own stream, apart from the shuffling's: the crops never move the batch order.
            crops = torch.Generator().manual_seed(epoch_seed + 2**32) if config.augment else None
            steps = read(train_data, config.batch_size, shuffle=True, seed=epoch_seed)
            for step, (x, y) in enumerate(steps, 1):
                x, y = to_device(x, device, config.channels_last), y.to(device, non_blocking=True)
                if crops is not None:
                    x = random_resized_crop_flip(x, crops)
                with autocast(device, config.precision):
                    out = model(x)
                    loss = nn.functional.cross_entropy(out.float(), y)
                extra = hooks.penalty(model)
                if extra is not None:
                    loss = loss + extra
                finite &= torch.isfinite(loss.detach())
                if step % check_every == 0 and not finite:
                    status = "diverged"
                    break
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().to(loss_sum.dtype) * len(y)
                seen += len(y)
            if not finite:  # the steps since the last check
                status = "diverged"
            train_images += seen
            if status == "diverged":
                break
            if scheduler is not None:
                scheduler.step()
            val = evaluate(
                model,
                val_data,
                config.eval_batch_size,
                device,
                config.precision,
                config.channels_last,
                read,
            )
            eval_images += len(val_data)  # type: ignore[arg-type]
            metric = val.get(config.metric)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(loss_sum) / max(seen, 1),
                    "val_top1": val.top1,
                    "val_balanced": val.balanced,
                    "val_loss": val.loss,
                    "val_likelihood": val.likelihood,
                }
            )
            if metric > best_metric:
                best_metric, best_epoch, best_val, since_best = metric, epoch + 1, val, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            hooks.on_epoch_end(epoch, {**history[-1], "seconds": time.perf_counter() - epoch_start})
            if hooks.should_stop(epoch, metric):
                status = "pruned"
                break
            if stops_early(config, epoch + 1, since_best):
                break
    except torch.cuda.OutOfMemoryError:
        raise BioTuneError(_oom_message(config)) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise BioTuneError(_oom_message(config)) from None
        raise
    finally:
        read.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if status == "diverged":
        best_val = Metrics(0.0, 0.0)
    return TrainResult(
        val=best_val,
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        seconds=time.perf_counter() - start,
        train_images=train_images,
        eval_images=eval_images,
        status=status,
        history=history,
    )


def stops_early(config: TrainConfig, epochs_run: int, since_best: int) -> bool:
    """Whether a run stops after ``epochs_run`` epochs, ``since_best`` of them in a row without
    a new best: the patience has run out, and ``min_epochs_share`` of the schedule has run."""
    least = math.ceil(config.min_epochs_share * config.epochs - 1e-9)
    return since_best > 0 and since_best >= config.patience and epochs_run >= least


def reinit_head(model: nn.Module, partition: BlockPartition, seed: int) -> None:
    """Re-draw the new head from ``seed``: seeds vary the head as well as the data order.

    Drawn from the CPU's generator wherever the model sits (a CUDA tensor would draw from the
    GPU's), so one seed gives one head on every device; no generator's state changes."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        for module in partition.modules(model, partition.names[-1]):
            if hasattr(module, "reset_parameters"):
                home = device_of(module)
                module.to("cpu").reset_parameters()
                module.to(home)


def train_plan(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    train_data: Dataset,
    val_data: Dataset,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    hooks: TrainHooks | None = None,
    copy_model: bool = True,
) -> tuple[nn.Module, TrainResult]:
    """Fine-tune (a copy of) ``model`` under ``plan``; returns the trained model and its result."""
    if copy_model:
        model = copy.deepcopy(model)
    seed_everything(seed)
    reinit_head(model, partition, seed)
    groups = apply_plan(model, partition, plan, config.base_lr, frozen_eval=config.frozen_eval)
    result = fine_tune(model, groups, train_data, val_data, config, seed, device, hooks)
    return model, result


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
