"""Fine-tuning plans: the genome <-> plan mapping and the one way a plan is applied to a model.

A plan says, for every block of a :class:`~biotune.blocks.BlockPartition`, whether the block is
fine-tuned and at which multiple of the base learning rate. It is a small JSON value; applying it
gives plain optimizer param groups that any ``torch.optim`` optimizer takes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from biotune.blocks import BlockPartition
from biotune.errors import BioTuneError

LR_DECADES = 2.0  # a gene g maps to base_lr * 10 ** (LR_DECADES * (g - 0.5)): x0.1 .. x10


@dataclass(frozen=True)
class BlockSetting:
    """What a plan does with one block."""

    name: str
    train: bool
    lr_mult: float = 1.0


@dataclass(frozen=True)
class FineTunePlan:
    """Per block, in partition order: frozen or fine-tuned, and the learning-rate multiplier."""

    blocks: tuple[BlockSetting, ...]

    def __post_init__(self) -> None:
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise BioTuneError(f"plan names a block twice: {names}")
        for b in self.blocks:
            if b.train and not (math.isfinite(b.lr_mult) and b.lr_mult > 0):
                raise BioTuneError(
                    f"plan block '{b.name}': lr_mult must be a positive number (got {b.lr_mult})"
                )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks if b.train)

    @property
    def frozen_prefix(self) -> int:
        """How many leading blocks are frozen (their output never changes during training)."""
        n = 0
        for b in self.blocks:
            if b.train:
                break
            n += 1
        return n

    def setting(self, name: str) -> BlockSetting:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def key(self, digits: int = 6) -> tuple:
        """A hashable identity: plans with the same key train identically (for memoisation)."""
        return tuple(
            (b.name, round(b.lr_mult, digits) if b.train else None) for b in self.blocks
        )

    @classmethod
    def full(cls, names: Sequence[str]) -> FineTunePlan:
        """Fine-tune every block at the base learning rate."""
        return cls(tuple(BlockSetting(n, True, 1.0) for n in names))

    @classmethod
    def head_only(cls, names: Sequence[str]) -> FineTunePlan:
        """Linear probing: only the last block (the new head) trains."""
        last = len(names) - 1
        return cls(tuple(BlockSetting(n, i == last, 1.0) for i, n in enumerate(names)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": [
                {"name": b.name, "train": b.train, "lr_mult": b.lr_mult} for b in self.blocks
            ]
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> FineTunePlan:
        """Parse a plan; ``source`` names the file in the one-line error.

        Types are checked, not coerced: ``"train": "false"`` would otherwise read as True.
        """
        blocks = data.get("blocks") if isinstance(data, dict) else None
        if not isinstance(blocks, list):
            raise BioTuneError(
                f"{source}: not a fine-tuning plan (expected "
                '{"blocks": [{"name": ..., "train": true, "lr_mult": 1.0}, ...]})'
            )
        if not blocks:
            raise BioTuneError(f"{source}: the plan has no blocks")
        settings = []
        for i, b in enumerate(blocks):
            where = f"{source}: block {i}"
            if not isinstance(b, dict):
                raise BioTuneError(f"{where} must be an object (got {b!r})")
            name, train, lr_mult = b.get("name"), b.get("train"), b.get("lr_mult", 1.0)
            if not isinstance(name, str):
                raise BioTuneError(f'{where}: "name" must be a string (got {name!r})')
            where = f"{where} '{name}'"
            if not isinstance(train, bool):
                raise BioTuneError(f'{where}: "train" must be true or false (got {train!r})')
            if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)):
                raise BioTuneError(f'{where}: "lr_mult" must be a number (got {lr_mult!r})')
            settings.append(BlockSetting(name, train, float(lr_mult)))
        return cls(tuple(settings))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FineTunePlan:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise BioTuneError(f"cannot read plan file {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BioTuneError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=str(path))

    def check_fits(self, partition: BlockPartition, source: str = "plan") -> None:
        """Refuse a plan made for another model (its blocks differ from the partition's)."""
        if self.names != partition.names:
            missing = [n for n in partition.names if n not in self.names]
            extra = [n for n in self.names if n not in partition.names]
            raise BioTuneError(
                f"{source} does not fit the model: model blocks {list(partition.names)}; "
                f"missing {missing}, unknown {extra}"
            )
        if not self.trained:
            raise BioTuneError(f"{source} trains no block")

    def describe(self) -> str:
        """One line: which blocks train, at which multiplier."""
        parts = [f"{b.name} x{b.lr_mult:.3g}" for b in self.blocks if b.train]
        return f"{len(parts)}/{len(self.blocks)} blocks: " + ", ".join(parts)


def genome_is_valid(genes: np.ndarray) -> bool:
    """A genome must select at least one block (some gene above the threshold)."""
    genes = np.asarray(genes, dtype=float)
    return bool(np.any(genes[:-1] > genes[-1]))


def decode_genome(genes: Sequence[float] | np.ndarray, names: Sequence[str]) -> FineTunePlan:
    """B+1 block genes and a threshold gene -> plan (block trains iff gene > threshold)."""
    genes = np.asarray(genes, dtype=float)
    if genes.shape != (len(names) + 1,):
        raise BioTuneError(
            f"a genome for {len(names)} blocks needs {len(names) + 1} genes (got {genes.size})"
        )
    threshold = genes[-1]
    return FineTunePlan(
        tuple(
            BlockSetting(n, bool(g > threshold), float(10 ** (LR_DECADES * (g - 0.5))))
            if g > threshold
            else BlockSetting(n, False, 1.0)
            for n, g in zip(names, genes[:-1], strict=True)
        )
    )


def encode_plan(plan: FineTunePlan) -> np.ndarray:
    """Plan -> a genome that decodes back to it (frozen genes 0, threshold just below the rest)."""
    trained = [
        0.5 + math.log10(b.lr_mult) / LR_DECADES for b in plan.blocks if b.train
    ]
    if not trained:
        raise BioTuneError("cannot encode a plan that trains no block")
    if min(trained) <= 0 or max(trained) > 1:
        raise BioTuneError("lr multipliers must lie in (0.1, 10] to be encoded as a genome")
    genes = [
        0.5 + math.log10(b.lr_mult) / LR_DECADES if b.train else 0.0 for b in plan.blocks
    ]
    return np.array([*genes, min(trained) / 2], dtype=float)


def frozen_modules(model: nn.Module, partition: BlockPartition, plan: FineTunePlan) -> list[str]:
    """Names of the modules that must run in eval mode: everything inside frozen blocks.

    Besides the modules that hold a frozen block's parameters and buffers (BatchNorm), this takes
    parameter-free modules (dropout, drop-path) whose parent lies wholly in frozen blocks, so that a
    frozen block is a deterministic function of its input.
    """
    frozen_blocks = {b.name for b in plan.blocks if not b.train}
    owner: dict[str, str] = {}
    for block in partition:
        for m in block.module_names:
            owner[m] = block.name
    names = [m for m, b in owner.items() if b in frozen_blocks]
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name in owner or not name:
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        blocks = {
            b for m, b in owner.items() if parent == "" or m == parent or m.startswith(parent + ".")
        }
        if parent and blocks and blocks <= frozen_blocks and len(blocks) == 1:
            names.append(name)
    return sorted(names)


def user_frozen(model: nn.Module) -> frozenset[int]:
    """Ids of the parameters the user froze (``requires_grad=False``) before any plan touched the
    model: a fixed positional embedding or scale stays frozen whatever a plan says, and counts as
    frozen. Noted on the model at the first ``apply_plan`` (copies of the model keep the note).
    """
    noted = getattr(model, "_biotune_user_frozen", None)
    if noted is None:
        noted = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
        model._biotune_user_frozen = noted  # type: ignore[attr-defined]
    params = dict(model.named_parameters())
    return frozenset(id(params[n]) for n in noted if n in params)


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def apply_plan(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    base_lr: float,
    *,
    frozen_eval: bool = True,
) -> list[dict[str, Any]]:
    """Freeze and unfreeze blocks, and return one optimizer param group per trained block.

    Each group is ``{"params", "lr": base_lr * lr_mult, "name": block}``. With ``frozen_eval``
    (the default), modules of frozen blocks are held in eval mode whatever ``model.train()``
    later says, so frozen BatchNorm statistics stay untouched (the authors' code let them drift;
    ``frozen_eval=False`` gives that behaviour back). Applying another plan undoes this one.
    """
    plan.check_fits(partition)
    for handle in getattr(model, "_biotune_eval_hooks", []):
        handle.remove()
    held = user_frozen(model)
    groups: list[dict[str, Any]] = []
    for setting in plan.blocks:
        params = [p for p in partition.parameters(model, setting.name) if id(p) not in held]
        for p in params:
            p.requires_grad_(setting.train)
        if setting.train and params:
            groups.append(
                {"params": params, "lr": base_lr * setting.lr_mult, "name": setting.name}
            )
    handles = []
    if frozen_eval:
        modules = dict(model.named_modules())
        for name in frozen_modules(model, partition, plan):
            modules[name].training = False
            handles.append(modules[name].register_forward_pre_hook(_force_eval))
    model._biotune_eval_hooks = handles  # type: ignore[attr-defined]
    return groups
