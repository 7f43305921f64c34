"""The search protocol: how one genome is scored.

An evaluation decodes the genome into a plan, fine-tunes a fresh copy of the pretrained model on
one stratified fold of the training data for each seed, and scores it on the validation split.
Fitness = 1 - mean validation metric (lower is better). The fold is chosen by the generation, and
the evolution never ranks scores from different folds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from biotune.blocks import BlockPartition
from biotune.data import DatasetSplits, stratified_folds, subset
from biotune.errors import BioTuneError
from biotune.plan import decode_genome, genome_is_valid
from biotune.training import TrainConfig, TrainHooks, default_device, train_plan

WORST_FITNESS = 1.0


@dataclass(frozen=True)
class SearchProtocol:
    """How each candidate is trained and scored during the search."""

    data_fraction: float = 0.5  # each evaluation trains on this share of the training split
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    memoize: bool = True  # an equivalent plan on the same fold and seeds is not retrained

    def __post_init__(self) -> None:
        if not (0 < self.data_fraction <= 1):
            raise BioTuneError(
                f"data_fraction must be in (0, 1] (got {self.data_fraction})"
            )
        if not self.seeds:
            raise BioTuneError("seeds must name at least one seed")

    @property
    def folds(self) -> int:
        """Disjoint stratified folds of the training split; generation g trains on fold g mod k."""
        return max(1, round(1 / self.data_fraction))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchProtocol:
        return cls(
            data_fraction=d["data_fraction"],
            seeds=tuple(d["seeds"]),
            train=TrainConfig(**d["train"]),
            memoize=d["memoize"],
        )


@dataclass
class Evaluation:
    """One record of the run: a genome scored on one fold over the protocol's seeds."""

    candidate: int
    generation: int
    role: str
    genes: list[float]
    plan: dict[str, Any]
    fold: int
    seeds: list[int]
    scores: list[float]  # validation metric per seed
    fitness: float
    status: str  # "ok", "invalid", "diverged", "pruned"
    seconds: float
    train_images: int
    eval_images: int
    epochs: list[int]
    curves: list[list[float]] = field(default_factory=list)  # validation metric per epoch, per seed
    reused_from: int | None = None  # memoised: the candidate whose identical evaluation this copies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Scores genomes for one model and dataset; holds the folds so every worker agrees on them."""

    def __init__(
        self,
        model: nn.Module,
        partition: BlockPartition,
        splits: DatasetSplits,
        protocol: SearchProtocol,
        fold_seed: int = 0,
        device: Any = None,
    ) -> None:
        self.model = model
        self.partition = partition
        self.splits = splits
        self.protocol = protocol
        self.device = device or default_device()
        targets = np.asarray(splits.train.targets)
        self.folds = (
            [np.arange(len(targets))]
            if protocol.folds == 1
            else stratified_folds(targets, protocol.folds, fold_seed)
        )

    def fold_of(self, generation: int) -> int:
        return generation % len(self.folds)

    def hooks_for(
        self, candidate: int, seed: int, reference: list[list[float]] | None
    ) -> TrainHooks | None:
        """Per-run hooks (early termination plugs in here)."""
        return None

    def evaluate(
        self,
        candidate: int,
        genes: np.ndarray,
        generation: int,
        role: str = "",
        reference: list[list[float]] | None = None,
    ) -> Evaluation:
        """Score one genome; ``reference`` holds validation curves of this generation's elites."""
        genes = np.asarray(genes, dtype=float)
        plan = decode_genome(genes, self.partition.names)
        fold = self.fold_of(generation)
        seeds = list(self.protocol.seeds)
        start = time.perf_counter()
        if not genome_is_valid(genes):
            return Evaluation(
                candidate, generation, role, genes.tolist(), plan.to_dict(), fold, seeds,
                [], WORST_FITNESS, "invalid", 0.0, 0, 0, [],
            )
        train = subset(self.splits.train, self.folds[fold])
        scores, epochs, curves, status = [], [], [], "ok"
        train_images = eval_images = 0
        for seed in seeds:
            _, result = train_plan(
                self.model, self.partition, plan, train, self.splits.val,
                self.protocol.train, seed=seed, device=self.device,
                hooks=self.hooks_for(candidate, seed, reference),
            )
            curves.append([h[f"val_{self.protocol.train.metric}"] for h in result.history])
            train_images += result.train_images
            eval_images += result.eval_images
            epochs.append(result.epochs_run)
            if result.status != "ok":
                status = result.status
            score = result.val.get(self.protocol.train.metric)
            scores.append(score if math.isfinite(score) else 0.0)
            if status == "diverged":
                break
        fitness = WORST_FITNESS if status == "diverged" else 1.0 - float(np.mean(scores))
        return Evaluation(
            candidate, generation, role, genes.tolist(), plan.to_dict(), fold, seeds, scores,
            fitness, status, time.perf_counter() - start, train_images, eval_images, epochs,
            curves,
        )
