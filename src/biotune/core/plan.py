"""Fine-tuning plans and the genome coding: genes <-> ``FineTunePlan`` (numpy only).

A plan says, for every block of a :class:`~biotune.blocks.BlockPartition`, whether the block is
fine-tuned and at which multiple of the base learning rate. It is a small JSON value;
:func:`biotune.freezing.apply_plan` applies it to a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from biotune.errors import BioTuneError

if TYPE_CHECKING:
    from biotune.blocks import BlockPartition

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
        return tuple((b.name, round(b.lr_mult, digits) if b.train else None) for b in self.blocks)

    @classmethod
    def full(cls, names: Sequence[str]) -> FineTunePlan:
        """Fine-tune every block at the base learning rate."""
        return cls(tuple(BlockSetting(n, True, 1.0) for n in names))

    @classmethod
    def head_only(cls, names: Sequence[str]) -> FineTunePlan:
        """Linear probing: only the last block (the new head) trains."""
        last = len(names) - 1
        return cls(tuple(BlockSetting(n, i == last, 1.0) for i, n in enumerate(names)))

    @classmethod
    def layer_decay(cls, names: Sequence[str], decay: float) -> FineTunePlan:
        """Layer-wise learning-rate decay (LLRD): every block trains, the last (the head) at the
        base rate and each block below at ``decay`` times the rate of the block above, so block
        ``i`` of ``B`` gets ``decay ** (B - 1 - i)``: the practitioner's hand-made per-block plan
        (BEiT, MAE; timm's ``layer_decay``), over this partition's blocks."""
        if not (math.isfinite(decay) and 0 < decay <= 1):
            raise BioTuneError(f"layer decay must lie in (0, 1] (got {decay})")
        last = len(names) - 1
        return cls(tuple(BlockSetting(n, True, decay ** (last - i)) for i, n in enumerate(names)))

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
    trained = [0.5 + math.log10(b.lr_mult) / LR_DECADES for b in plan.blocks if b.train]
    if not trained:
        raise BioTuneError("cannot encode a plan that trains no block")
    if min(trained) <= 0 or max(trained) > 1:
        raise BioTuneError("lr multipliers must lie in (0.1, 10] to be encoded as a genome")
    genes = [0.5 + math.log10(b.lr_mult) / LR_DECADES if b.train else 0.0 for b in plan.blocks]
    return np.array([*genes, min(trained) / 2], dtype=float)


def trained_mask(genes: Sequence[float] | np.ndarray) -> tuple[bool, ...]:
    """Which blocks a genome trains (gene above the threshold gene)."""
    genes = np.asarray(genes, dtype=float)
    return tuple(bool(g > genes[-1]) for g in genes[:-1])
