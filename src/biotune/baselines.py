"""The paper's baselines, each one fine-tuning run built on :func:`biotune.training.fine_tune`.

Every baseline differs from full fine-tuning only in what it trains and how: its param groups and
its :class:`~biotune.training.TrainHooks`. The optimizer, schedule, early stopping, seeds and data
are the shared recipe, so a comparison measures the method and nothing else.

* ``full``: every parameter at the base learning rate.
* ``linear``: linear probing, only the new head trains.
* ``autorgn``: one param group per tensor; before each epoch, relative gradient norms
  ``||grad|| / ||w||`` averaged over a few training mini-batches set each tensor's learning rate to
  ``schedule(epoch) * base_lr * RGN / max RGN`` (Lee et al. 2023). The ratios really reach the
  optimizer, unlike the authors' code.
* ``lora``: PEFT LoRA adapters on the convolution and linear layers, base weights frozen, the new
  head trained fully; grouped convolutions PEFT cannot adapt are skipped and reported.
* ``l2sp`` / ``l1sp``: full fine-tuning plus ``alpha/2 * ||w - w0||^2`` (``alpha * |w - w0|_1``)
  on the pretrained weights and ``beta/2 * ||w_head||^2`` on the new head (Li et al. 2018).
* ``llrd``: layer-wise learning-rate decay (BEiT, MAE, timm's ``layer_decay``): every block
  trains, the head at the base lr and each block below at ``decay`` times the rate of the block
  above: a plan of BioTune's own kind (:meth:`~biotune.core.plan.FineTunePlan.layer_decay`).
* ``lpft``: LP-FT (Kumar et al. 2022): the new head alone first (linear probing), then every
  block from that head; both phases share one run's epoch budget (:func:`lpft_phases`).
* ``plan``: a given :class:`~biotune.core.plan.FineTunePlan` (BioTune's winner) under the same
  recipe.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from biotune.blocks import BlockPartition
from biotune.core.fields import option
from biotune.core.plan import FineTunePlan
from biotune.errors import BioTuneError
from biotune.freezing import apply_plan
from biotune.runner.workbench import Workbench
from biotune.training import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    count_parameters,
    default_device,
    fine_tune,
    reinit_head,
    seed_everything,
    train_plan,
)


@dataclass(frozen=True)
class BaselineOptions:
    """The baselines' own settings, each with its command-line flag (``biotune compare``).

    L2-SP / L1-SP strengths (Li et al. choose them on validation) sum over elements, as in the
    paper. L2-SP: alpha = beta = 0.01, the usual setting. L1-SP's pull has the same size alpha on
    every weight however close to its start, so with Adam alpha = 0.01 pins the backbone (it
    then trains like a linear probe); 1e-4 pulls about as hard as L2-SP's 0.01 at the
    displacements of a fine-tuning run (1e-3 to 1e-2). LoRA: the common rank and scaling.
    """

    lora_rank: int = option(8, flag="--lora-rank", type="positive_int", help="LoRA rank")
    lora_alpha: float = option(
        16.0, flag="--lora-alpha", help="LoRA alpha; its scaling is alpha/rank"
    )
    l2sp_alpha: float = option(
        0.01, flag="--l2sp-alpha", help="L2-SP pull toward the pretrained weights"
    )
    l1sp_alpha: float = option(
        1e-4, flag="--l1sp-alpha", help="L1-SP pull toward the pretrained weights"
    )
    sp_beta: float = option(0.01, flag="--sp-beta", help="L2-SP/L1-SP weight decay of the head")
    rgn_batches: int = option(
        3,
        flag="--rgn-batches",
        type="positive_int",
        help="AutoRGN: training mini-batches its gradient norms average over, each epoch",
    )
    llrd_decay: float = option(
        0.65,
        flag="--llrd-decay",
        help="LLRD: each block's lr is this times the lr of the block above it (one run; "
        "compare tunes it over --llrd-decays unless given)",
    )
    llrd_decays: tuple[float, ...] = option(
        (0.5, 0.65, 0.8),
        flag="--llrd-decays",
        type="floats",
        metavar="D,D,...",
        help="LLRD: the decays compare tries, each with every lr of the grid",
    )
    lpft_head_lr: float | None = option(
        None,
        flag="--lpft-head-lr",
        type="float",
        none="chosen on validation like linear probing's lr; 1e-2 for a single run",
        help="LP-FT: the learning rate of its first phase (the head alone)",
    )
    lpft_head_share: float = option(
        1 / 3,
        flag="--lpft-head-share",
        type="fraction",
        help="LP-FT: the share of the epochs its first phase (the head alone) takes; the rest "
        "fine-tune every block",
    )

    def __post_init__(self) -> None:
        if not (0 < self.llrd_decay <= 1):
            raise BioTuneError(f"--llrd-decay must lie in (0, 1] (got {self.llrd_decay:g})")
        if not self.llrd_decays or any(not (0 < d <= 1) for d in self.llrd_decays):
            raise BioTuneError(f"--llrd-decays must lie in (0, 1] (got {list(self.llrd_decays)})")
        if self.lpft_head_lr is not None and not (
            math.isfinite(self.lpft_head_lr) and self.lpft_head_lr > 0
        ):
            raise BioTuneError(f"--lpft-head-lr must be positive (got {self.lpft_head_lr:g})")
        if not (0 < self.lpft_head_share < 1):
            raise BioTuneError(
                "--lpft-head-share must lie strictly between 0 and 1 "
                f"(got {self.lpft_head_share:g})"
            )


#: The defaults every method's keyword options take.
DEFAULTS = BaselineOptions()
#: LP-FT's head-phase learning rate when none is given or tuned (a new linear head takes a rate
#: well above a backbone's; compare and the accuracy benchmark choose it on validation instead).
LPFT_HEAD_LR = 1e-2


@dataclass
class BaselineRun:
    """One trained model, what its training measured, and how many parameters it trained."""

    model: nn.Module
    result: TrainResult
    trainable_params: int
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[..., BaselineRun]


# ---------------------------------------------------------------------------------------------
# full fine-tuning, linear probing, a given plan


def _run_plan(
    bench: Workbench,
    plan: FineTunePlan,
    config: TrainConfig,
    seed: int,
    device: torch.device | None,
    hooks: TrainHooks | None = None,
    model: nn.Module | None = None,
) -> BaselineRun:
    """Train a copy of the bench's model under ``plan``; a plain plan (no hooks) that freezes the
    first blocks trains on the bench's cached features of them (linear probing, searched plans).
    """
    if model is None and hooks is None:
        model, result, cached = bench.train(plan, config, seed, device)
        run = BaselineRun(model, result, count_parameters(model, trainable_only=True))
        run.info["cached_prefix"] = cached
        return run
    model, result = train_plan(
        model if model is not None else bench.model,
        bench.partition,
        plan,
        bench.splits.train,
        bench.splits.val,
        config,
        seed=seed,
        device=device,
        hooks=hooks,
        copy_model=model is None,
    )
    return BaselineRun(model, result, count_parameters(model, trainable_only=True))


def run_full(
    bench: Workbench, config: TrainConfig, seed: int = 0, device: torch.device | None = None
) -> BaselineRun:
    """Full fine-tuning: every block at the base learning rate."""
    return _run_plan(bench, FineTunePlan.full(bench.partition.names), config, seed, device)


def run_linear(
    bench: Workbench, config: TrainConfig, seed: int = 0, device: torch.device | None = None
) -> BaselineRun:
    """Linear probing: the backbone is frozen (BatchNorm statistics included), the head trains."""
    return _run_plan(bench, FineTunePlan.head_only(bench.partition.names), config, seed, device)


def run_given_plan(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    plan: FineTunePlan,
) -> BaselineRun:
    """A searched plan (BioTune's winner), trained exactly like the baselines."""
    plan.check_fits(bench.partition)
    return _run_plan(bench, plan, config, seed, device)


# ---------------------------------------------------------------------------------------------
# layer-wise learning-rate decay, LP-FT


def run_llrd(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    llrd_decay: float = DEFAULTS.llrd_decay,
) -> BaselineRun:
    """Layer-wise lr decay: the head at the base lr, each block below ``llrd_decay`` times the
    rate of the block above (over the blocks ``biotune blocks`` prints). timm's
    ``param_groups_layer_decay`` counts layers from its own ``group_matcher``; we count our
    partition's blocks, so the decay means the same thing for every model and for BioTune."""
    plan = FineTunePlan.layer_decay(bench.partition.names, llrd_decay)
    run = _run_plan(bench, plan, config, seed, device)
    run.info.update({"decay": llrd_decay, "plan": plan.to_dict()})
    return run


def lpft_phases(
    names: Sequence[str],
    config: TrainConfig,
    head_lr: float = LPFT_HEAD_LR,
    head_share: float = DEFAULTS.lpft_head_share,
) -> list[tuple[FineTunePlan, TrainConfig]]:
    """LP-FT as a recipe a user can run in their own loop: (plan, training config) per phase.

    Phase 1 trains the new head alone at ``head_lr`` for ``round(head_share * epochs)`` epochs
    (at least 1); phase 2 fine-tunes every block at the base lr, starting from that head, for the
    remaining epochs with its own cosine schedule. Each phase stops early on validation like any
    run, so LP-FT never trains more epochs than one run of the recipe.
    """
    if config.epochs < 2:
        raise BioTuneError(f"LP-FT needs at least 2 epochs, one per phase (got {config.epochs})")
    head_epochs = min(max(1, round(head_share * config.epochs)), config.epochs - 1)
    probe = replace(
        config, base_lr=head_lr, epochs=head_epochs, patience=min(config.patience, head_epochs)
    )
    tune = replace(
        config,
        epochs=config.epochs - head_epochs,
        patience=min(config.patience, config.epochs - head_epochs),
    )
    return [(FineTunePlan.head_only(names), probe), (FineTunePlan.full(names), tune)]


def run_lpft(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    lpft_head_lr: float | None = DEFAULTS.lpft_head_lr,
    lpft_head_share: float = DEFAULTS.lpft_head_share,
) -> BaselineRun:
    """LP-FT (Kumar et al. 2022): linear probing first, then full fine-tuning from that head, so
    a random head never sends large gradients into the pretrained features.

    The result is the second phase's (its best epoch restored); the history holds both phases'
    epochs in order, and ``info["phases"]`` what each phase trained and saw (for its cost).
    """
    head_lr = LPFT_HEAD_LR if lpft_head_lr is None else lpft_head_lr
    (probe_plan, probe), (tune_plan, tune) = lpft_phases(
        bench.partition.names, config, head_lr, lpft_head_share
    )
    model, first, cached = bench.train(probe_plan, probe, seed, device)
    seed_everything(seed)
    groups = apply_plan(
        model, bench.partition, tune_plan, tune.base_lr, frozen_eval=tune.frozen_eval
    )
    second = fine_tune(model, groups, bench.splits.train, bench.splits.val, tune, seed, device)
    history = [
        *first.history,
        *({**h, "epoch": h["epoch"] + first.epochs_run} for h in second.history),
    ]
    result = replace(
        second,
        best_epoch=second.best_epoch + first.epochs_run,
        epochs_run=first.epochs_run + second.epochs_run,
        seconds=first.seconds + second.seconds,
        train_images=first.train_images + second.train_images,
        eval_images=first.eval_images + second.eval_images,
        history=history,
    )
    phases = [
        {
            "name": "head",
            "lr": head_lr,
            "epochs": probe.epochs,
            "epochs_run": first.epochs_run,
            "val_balanced": first.val.balanced,
            "cached_prefix": cached,
            "first_trained": len(bench.partition) - 1,
            "train_images": first.train_images,
            "eval_images": first.eval_images,
        },
        {
            "name": "all blocks",
            "lr": tune.base_lr,
            "epochs": tune.epochs,
            "epochs_run": second.epochs_run,
            "val_balanced": second.val.balanced,
            "cached_prefix": 0,
            "first_trained": 0,
            "train_images": second.train_images,
            "eval_images": second.eval_images,
        },
    ]
    info = {"head_lr": head_lr, "head_share": lpft_head_share, "phases": phases}
    return BaselineRun(model, result, count_parameters(model, trainable_only=True), info)


# ---------------------------------------------------------------------------------------------
# AutoRGN


def schedule_factor(config: TrainConfig, epoch: int) -> float:
    """The learning-rate schedule's multiplier at the start of ``epoch`` (cosine, eta_min 0).

    The closed form of ``CosineAnnealingLR(T_max=config.epochs)``, which ``fine_tune`` uses.
    """
    if config.scheduler == "none":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))


class AutoRGNHooks(TrainHooks):
    """Per-tensor learning rates from relative gradient norms, recomputed before every epoch.

    The optimizer must hold one param group per tensor (``per_tensor_groups``). Before each epoch
    the hook measures ``||grad|| / ||w||`` per tensor on ``batches`` training mini-batches (in
    train mode, BatchNorm statistics restored afterwards, gradients cleared), normalises by the
    largest, and sets ``lr = initial_lr * schedule_factor(epoch) * ratio``: the cosine schedule and
    the ratios compose as a product, and the scheduler's own step is overwritten each epoch. A
    tensor whose weights are all zero has no scale to be relative to and gets ratio 1.
    ``history`` keeps, per epoch, the measured RGN, the ratios and the learning rates set.
    """

    def __init__(self, config: TrainConfig, batches: int = DEFAULTS.rgn_batches) -> None:
        if batches < 1:
            raise BioTuneError(f"AutoRGN needs at least one mini-batch to measure (got {batches})")
        self.config = config
        self.batches = batches
        self.history: list[dict[str, Any]] = []

    def on_epoch_start(
        self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any
    ) -> None:
        groups = optimizer.param_groups
        if any(len(g["params"]) != 1 for g in groups):
            raise BioTuneError("AutoRGN needs one optimizer param group per tensor")
        params = [g["params"][0] for g in groups]
        rgn = measure_rgn(model, params, batches(), self.batches)
        top = max((r for r in rgn if math.isfinite(r)), default=0.0)
        ratios = [1.0 if not math.isfinite(r) or top <= 0 else r / top for r in rgn]
        factor = schedule_factor(self.config, epoch)
        for g, ratio in zip(groups, ratios, strict=True):
            g["lr"] = g["initial_lr"] * factor * ratio
        names = [str(g.get("name", i)) for i, g in enumerate(groups)]
        self.history.append(
            {
                "epoch": epoch,
                "rgn": dict(zip(names, rgn, strict=True)),
                "ratio": dict(zip(names, ratios, strict=True)),
                "lr": {n: g["lr"] for n, g in zip(names, groups, strict=True)},
            }
        )


def measure_rgn(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    count: int,
) -> list[float]:
    """Mean ``||grad|| / ||w||`` per tensor over ``count`` mini-batches; ``inf`` where ``w = 0``.

    Measuring trains nothing: gradients are cleared and BatchNorm running statistics restored.
    """
    device = params[0].device
    buffers = [b.detach().clone() for b in model.buffers()]
    norms = [float(p.detach().norm()) for p in params]
    sums = [0.0] * len(params)
    seen = 0
    for x, y in batches:
        if seen == count:
            break
        for p in params:
            p.grad = None
        out = model(x.to(device))
        nn.functional.cross_entropy(out.float(), y.to(device)).backward()
        for i, p in enumerate(params):
            if p.grad is not None:
                sums[i] += float(p.grad.detach().norm())
        seen += 1
    for p in params:
        p.grad = None
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    if seen == 0:
        raise BioTuneError("AutoRGN: the training split yielded no mini-batch")
    means = [s / seen for s in sums]
    return [
        g / n if n > 0 else (math.inf if g > 0 else 0.0) for g, n in zip(means, norms, strict=True)
    ]


def per_tensor_groups(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split block param groups into one group per tensor, named after the parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {"params": [p], "lr": g["lr"], "name": names[id(p)], "block": g.get("name")}
        for g in groups
        for p in g["params"]
    ]


def run_autorgn(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    rgn_batches: int = DEFAULTS.rgn_batches,
) -> BaselineRun:
    """AutoRGN: full fine-tuning with per-tensor learning rates from relative gradient norms."""
    model = copy.deepcopy(bench.model)
    seed_everything(seed)
    reinit_head(model, bench.partition, seed)
    plan = FineTunePlan.full(bench.partition.names)
    groups = apply_plan(
        model, bench.partition, plan, config.base_lr, frozen_eval=config.frozen_eval
    )
    hooks = AutoRGNHooks(config, rgn_batches)
    result = fine_tune(
        model,
        per_tensor_groups(model, groups),
        bench.splits.train,
        bench.splits.val,
        config,
        seed,
        device,
        hooks,
    )
    last = hooks.history[-1]["ratio"] if hooks.history else {}
    return BaselineRun(
        model,
        result,
        count_parameters(model, trainable_only=True),
        {"rgn_batches": rgn_batches, "last_ratios": last},
    )


# ---------------------------------------------------------------------------------------------
# L2-SP and L1-SP


class SPRegularizer(TrainHooks):
    """The "starting point" penalty of Li et al. (2018), added to every mini-batch loss.

    ``alpha/2 * sum (w - w0)^2`` (``norm=2``) or ``alpha * sum |w - w0|`` (``norm=1``) over the
    pretrained tensors, plus ``beta/2 * sum w^2`` over the new head (which has no starting point).
    Sums over elements, as in the paper; zero at the pretrained weights, and its gradient points
    back to them.
    """

    def __init__(
        self,
        pretrained: Sequence[nn.Parameter],
        head: Sequence[nn.Parameter],
        alpha: float = DEFAULTS.l2sp_alpha,
        beta: float = DEFAULTS.sp_beta,
        norm: int = 2,
    ) -> None:
        if norm not in (1, 2):
            raise BioTuneError(f"SP penalty norm must be 1 or 2 (got {norm})")
        if alpha < 0 or beta < 0:
            raise BioTuneError(f"SP strengths must be >= 0 (got alpha={alpha}, beta={beta})")
        if not pretrained and not head:
            raise BioTuneError("SP penalty: no parameters to regularise")
        self.pretrained = list(pretrained)
        self.anchors = [p.detach().clone() for p in self.pretrained]
        self.head = list(head)
        self.alpha, self.beta, self.norm = alpha, beta, norm

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        partition: BlockPartition,
        alpha: float = DEFAULTS.l2sp_alpha,
        beta: float = DEFAULTS.sp_beta,
        norm: int = 2,
    ) -> SPRegularizer:
        """Anchor every non-head tensor of ``model`` at its current (pretrained) value."""
        head_name = partition.names[-1]
        pretrained = [p for n in partition.names[:-1] for p in partition.parameters(model, n)]
        return cls(pretrained, partition.parameters(model, head_name), alpha, beta, norm)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=(self.pretrained or self.head)[0].device)
        if self.alpha > 0 and self.pretrained:
            pairs = zip(self.pretrained, self.anchors, strict=True)
            if self.norm == 2:
                total = total + 0.5 * self.alpha * sum((p - w0).pow(2).sum() for p, w0 in pairs)
            else:
                total = total + self.alpha * sum((p - w0).abs().sum() for p, w0 in pairs)
        if self.beta > 0 and self.head:
            total = total + 0.5 * self.beta * sum(p.pow(2).sum() for p in self.head)
        return total


def _run_sp(
    bench: Workbench,
    config: TrainConfig,
    seed: int,
    device: torch.device | None,
    alpha: float,
    beta: float,
    norm: int,
) -> BaselineRun:
    model = copy.deepcopy(bench.model).to(device or default_device())
    hooks = SPRegularizer.for_model(model, bench.partition, alpha, beta, norm)
    run = _run_plan(
        bench,
        FineTunePlan.full(bench.partition.names),
        config,
        seed,
        device,
        hooks=hooks,
        model=model,
    )
    run.info = {"alpha": alpha, "beta": beta, "norm": norm}
    return run


def run_l2sp(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    l2sp_alpha: float = DEFAULTS.l2sp_alpha,
    sp_beta: float = DEFAULTS.sp_beta,
) -> BaselineRun:
    """L2-SP: full fine-tuning pulled back toward the pretrained weights by a squared distance."""
    return _run_sp(bench, config, seed, device, l2sp_alpha, sp_beta, 2)


def run_l1sp(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    l1sp_alpha: float = DEFAULTS.l1sp_alpha,
    sp_beta: float = DEFAULTS.sp_beta,
) -> BaselineRun:
    """L1-SP: like L2-SP with an absolute distance, which lets most weights stay exactly put."""
    return _run_sp(bench, config, seed, device, l1sp_alpha, sp_beta, 1)


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_targets(
    model: nn.Module, partition: BlockPartition, rank: int
) -> tuple[list[str], list[str]]:
    """(adapted, skipped) module names: convolutions and linear layers outside the head.

    PEFT adapts a grouped convolution only when the rank is a multiple of its groups; for a
    depthwise convolution that would mean a rank of at least its channel count, so such layers
    are skipped (and reported) rather than given a full-rank "adapter".
    """
    head = set(partition[partition.names[-1]].module_names)
    adapted, skipped = [], []
    for name, module in model.named_modules():
        if name in head or not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        groups = getattr(module, "groups", 1)
        if groups > 1 and rank % groups != 0:
            skipped.append(name)
        else:
            adapted.append(name)
    return adapted, skipped


def run_lora(
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    *,
    lora_rank: int = DEFAULTS.lora_rank,
    lora_alpha: float = DEFAULTS.lora_alpha,
) -> BaselineRun:
    """LoRA on the convolutions and linear layers (PEFT), the new head trained fully.

    Base parameters never change. BatchNorm layers of the base run in train mode like in any PEFT
    fine-tuning, so their running statistics follow the adapted features.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise BioTuneError(
            "the LoRA baseline needs peft: pip install 'biotune[baselines]'"
        ) from None

    if lora_rank < 1:
        raise BioTuneError(f"LoRA rank must be a positive integer (got {lora_rank})")
    model = copy.deepcopy(bench.model)
    seed_everything(seed)
    reinit_head(model, bench.partition, seed)
    head = bench.partition.parameters(model, bench.partition.names[-1])
    adapted, skipped = lora_targets(model, bench.partition, lora_rank)
    if not adapted:
        raise BioTuneError("LoRA: the model has no convolution or linear layer outside the head")
    if skipped:
        warnings.warn(
            f"LoRA: skipped {len(skipped)} of {len(adapted) + len(skipped)} conv/linear layers "
            f"(grouped convolutions whose groups do not divide rank {lora_rank}), e.g. "
            f"{', '.join(skipped[:3])}",
            stacklevel=2,
        )
    # An anchored regex names exactly these modules; PEFT's list form matches name suffixes.
    exact = "|".join(re.escape(n) for n in adapted)
    lora_config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=f"^(?:{exact})$",
    )
    model = get_peft_model(model, lora_config)
    # The head trains in place (PEFT's modules_to_save would pick modules by name suffix, which
    # can catch other layers); PEFT has frozen everything else.
    for p in head:
        p.requires_grad_(True)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [
        {"params": adapters, "lr": config.base_lr, "name": "lora"},
        {"params": head, "lr": config.base_lr, "name": "head"},
    ]
    result = fine_tune(model, groups, bench.splits.train, bench.splits.val, config, seed, device)
    return BaselineRun(
        model,
        result,
        count_parameters(model, trainable_only=True),
        {"rank": lora_rank, "alpha": lora_alpha, "adapted": len(adapted), "skipped": skipped},
    )


# ---------------------------------------------------------------------------------------------
# registry and learning-rate selection

METHODS: dict[str, Method] = {
    "full": run_full,
    "linear": run_linear,
    "autorgn": run_autorgn,
    "lora": run_lora,
    "l2sp": run_l2sp,
    "l1sp": run_l1sp,
    "llrd": run_llrd,
    "lpft": run_lpft,
    "plan": run_given_plan,
}

#: Display names for tables and plots.
LABELS = {
    "full": "Full fine-tuning",
    "linear": "Linear probing",
    "autorgn": "AutoRGN",
    "lora": "LoRA",
    "l2sp": "L2-SP",
    "l1sp": "L1-SP",
    "llrd": "Layer-wise lr decay",
    "lpft": "LP-FT",
    "plan": "Plan",
}


def run_baseline(
    name: str,
    bench: Workbench,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    **options: Any,
) -> BaselineRun:
    """Train ``bench.model`` (a copy; the bench is never changed) with baseline ``name``."""
    try:
        method = METHODS[name]
    except KeyError:
        raise BioTuneError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    grids = set(options) & {grid for _, grid in TUNED.values()}
    if grids:
        singles = ", ".join(o for o, _ in TUNED.values())
        raise BioTuneError(
            f"{', '.join(sorted(grids))} is a tuning grid: give it to select_lr (biotune "
            f"compare), or give one run its single value ({singles})"
        )
    unknown = set(options) - set(method_options(name))
    if unknown:
        raise BioTuneError(
            f"method {name!r} takes no option {', '.join(sorted(unknown))}; its options: "
            f"{', '.join(method_options(name)) or 'none'}"
        )
    return method(bench, config, seed, device, **options)


def method_options(name: str) -> tuple[str, ...]:
    """The keyword options one run of a method takes (e.g. ``lora_rank``)."""
    params = inspect.signature(METHODS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def tuning_options(name: str) -> tuple[str, ...]:
    """What ``select_lr`` takes for method ``name``: its options plus the grid it tunes over."""
    grid = (TUNED[name][1],) if name in TUNED else ()
    return (*method_options(name), *grid)


@dataclass
class LrSelection:
    """The setting chosen on validation (base lr, plus the method's tuned option if it has one,
    e.g. LLRD's decay), every grid point's score by its label, the winning run."""

    lr: float
    val: dict[str, float]
    best: BaselineRun
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    runs: int = 0


#: Options a method tunes jointly with the lr (the option, and the one that lists its grid).
TUNED = {"llrd": ("llrd_decay", "llrd_decays")}


def tuning_grid(
    name: str, lr_grid: Sequence[float], options: dict[str, Any]
) -> list[tuple[float, dict[str, Any]]]:
    """The (lr, options) points a method is tuned over: the lr grid, times the grid of the option
    it tunes (LLRD's decays) unless that option is given."""
    if name not in TUNED or TUNED[name][0] in options:
        return [(float(lr), {}) for lr in lr_grid]
    option_name, grid_name = TUNED[name]
    values = options.get(grid_name, getattr(DEFAULTS, grid_name))
    return [(float(lr), {option_name: v}) for v in values for lr in lr_grid]


def setting_label(lr: float, extra: dict[str, Any]) -> str:
    """'0.003' or '0.003, llrd_decay 0.65': a grid point as reports show it."""
    return ", ".join([f"{lr:g}", *(f"{k} {v:g}" for k, v in extra.items())])


def select_lr(
    name: str,
    bench: Workbench,
    config: TrainConfig,
    grid: Sequence[float] = (1e-4, 1e-3, 1e-2),
    seed: int = 0,
    device: torch.device | None = None,
    on_run: Callable[[BaselineRun], None] | None = None,
    **options: Any,
) -> LrSelection:
    """Pick the base learning rate from ``grid`` (jointly with the option the method tunes, see
    ``tuning_grid``) by the validation metric, never the test split.

    One run per grid point with ``seed``; ties go to the earlier point. The winning run is
    returned so that it can serve as that seed's final run (same recipe, same seed).
    ``on_run`` is called after each run (progress).
    """
    if not grid:
        raise BioTuneError("the learning-rate grid is empty")
    grid_name = TUNED.get(name, ("", ""))[1]
    fixed = {k: v for k, v in options.items() if k != grid_name}
    points = tuning_grid(name, grid, options)
    val: dict[str, float] = {}
    best: BaselineRun | None = None
    best_lr, best_extra, best_score, seconds = points[0][0], points[0][1], -math.inf, 0.0
    for lr, extra in points:
        run = run_baseline(name, bench, replace(config, base_lr=lr), seed, device, **fixed, **extra)
        if on_run is not None:
            on_run(run)
        score = run.result.val.get(config.metric) if run.result.status != "diverged" else 0.0
        val[setting_label(lr, extra)] = score
        seconds += run.result.seconds
        if score > best_score:
            best_lr, best_extra, best_score, best = lr, extra, score, run
    assert best is not None
    return LrSelection(best_lr, val, best, seconds, best_extra, len(points))
