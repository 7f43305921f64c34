"""The search protocol: how one genome is scored.

An evaluation decodes the genome into a plan, fine-tunes a fresh copy of the pretrained model on
one stratified fold of the training data for each seed, and scores it on the validation split.
Fitness = 1 - mean validation metric (lower is better). The fold is chosen by the generation, and
the evolution never ranks scores from different folds.

Three things make an evaluation cheaper without changing what it measures: frozen-prefix feature
caching (the frozen first blocks' output is computed once, exact to float rounding, see
``features.py``), early termination of runs clearly worse than this generation's elites at the
same epoch (``PruneConfig``), and memoisation of equivalent plans (``runner._optimize``). Each
record (``core.records.Evaluation``) says what it cost (``core.cost``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from biotune.blocks import BlockPartition
from biotune.core import cost
from biotune.core.fields import checked_fields, option
from biotune.core.plan import decode_genome, genome_is_valid
from biotune.core.records import WORST_FITNESS, Evaluation, Status
from biotune.core.splits import stratified_folds
from biotune.data import DatasetSplits, subset
from biotune.errors import BioTuneError
from biotune.features import (
    FeatureCache,
    FeatureDataset,
    batch_sizes_for,
    block_chain,
    cache_budget,
    check_cache_memory,
    train_plan_cached,
)
from biotune.measure import block_flops
from biotune.training import TrainConfig, TrainHooks, batches, default_device, train_plan


@dataclass(frozen=True)
class PruneConfig:
    """Early termination: stop a run that is clearly worse than the elites at the same epoch.

    After ``min_epochs`` epochs, a run whose best metric so far lies more than ``margin`` below
    the ``quantile`` of the reference runs' best-so-far at that epoch stops ("pruned"), in the
    spirit of median stopping. References are this generation's elite-phase curves, so only
    children and immigrants can be pruned, and a run with no reference never is.
    """

    enabled: bool = True
    min_epochs: int = 1
    quantile: float = option(
        0.5,
        flag="--prune-quantile",
        type="float",
        help="prune below this quantile of the elites' curves, 0.5 the median",
    )
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.min_epochs, int) or self.min_epochs < 1:
            raise BioTuneError(f"prune min_epochs must be an integer >= 1 (got {self.min_epochs})")
        if not (0.0 <= self.quantile <= 1.0):
            raise BioTuneError(f"prune quantile must be in [0, 1] (got {self.quantile})")
        if not math.isfinite(self.margin):
            raise BioTuneError(f"prune margin must be a finite number (got {self.margin})")


class PruneHooks(TrainHooks):
    """Asks after each epoch whether the run is clearly worse than the reference runs."""

    def __init__(
        self, reference: list[list[float]], config: PruneConfig, last_epoch: int | None = None
    ) -> None:
        self.reference = [np.maximum.accumulate(np.asarray(c, dtype=float)) for c in reference if c]
        self.config = config
        self.last_epoch = last_epoch  # stopping after it saves nothing, so it is never "pruned"
        self.best = -math.inf

    def threshold(self, epoch: int) -> float:
        """The bar at ``epoch``: a quantile of the references' best-so-far (finished runs hold)."""
        values = [c[min(epoch, len(c) - 1)] for c in self.reference]
        return float(np.quantile(values, self.config.quantile)) - self.config.margin

    def should_stop(self, epoch: int, metric: float) -> bool:
        if math.isfinite(metric):
            self.best = max(self.best, metric)
        if (
            not self.config.enabled
            or not self.reference
            or epoch + 1 < self.config.min_epochs
            or epoch == self.last_epoch
        ):
            return False
        return self.best < self.threshold(epoch)


#: How evaluations pick their fold (``SearchProtocol.fold_policy``).
FOLD_POLICIES = ("rotate", "fixed")

#: Protocol settings of the machine, not of the search: they change no score (cached training
#: is exact), only which evaluations train on cached features and so what they cost, and a run
#: directory resumes under other values (``runner._start.check_config``). ``cache_budget_mb``
#: is the name ``cache_memory`` had in run directories made before it.
MACHINE_SETTINGS = ("cache_memory", "cache_budget_mb")


@dataclass(frozen=True)
class SearchProtocol:
    """How each candidate is trained and scored during the search."""

    data_fraction: float = option(
        0.5,
        flag="--data-fraction",
        type="fraction",
        metavar="1/K",
        help="share of the training split each evaluation trains on: 1/k for a whole number k "
        "(1, 0.5, 1/3, 0.25, ...), the split cut into k folds that rotate per generation",
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    fold_policy: str = option(
        "rotate",
        flag="--fold-policy",
        choices=FOLD_POLICIES,
        help="'rotate': generation g trains on fold g mod k (the paper's protocol: a plan is "
        "compared only within its generation); 'fixed': every evaluation on fold 0 with the "
        "same seeds (common random numbers: scores of the whole search compare, an elite is "
        "not re-trained, and the re-ranking may take the best plans of the whole search)",
    )
    memoize: bool = option(
        True,
        flag="--memoize",
        negatable=True,
        help="do not retrain a plan already scored on the same fold and seeds",
    )
    cache_features: bool = option(
        False,
        flag="--cache",
        negatable=True,
        help="train on cached outputs of a plan's frozen first blocks, exactly",
    )
    cache_memory: str | float = option(
        "auto",
        flag="--cache-memory",
        type="cache_memory",
        metavar="auto|MB",
        help="memory for each evaluation worker's feature cache: 'auto', half of the memory "
        "available when the cache is made, split between the --workers (on a GPU, half of its "
        "free memory), or a number of MB; no score depends on it, only which evaluations train "
        "on cached features (the final training's cache is 'auto')",
    )
    prune: PruneConfig | None = None  # early termination of clearly worse runs; None: off
    # torch CPU threads per evaluation. On the CPU the thread count changes the floating-point
    # sums, so pinning it makes a search's result independent of the executor and its worker
    # count; parallelism comes from workers. None leaves torch's setting alone.
    cpu_threads: int | None = option(
        1,
        flag="--eval-threads",
        type="int",
        none="torch's choice",
        help="CPU threads per evaluation; results depend on it, so it is part of the configuration",
    )

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and (
            not isinstance(self.cpu_threads, int) or self.cpu_threads < 1
        ):
            raise BioTuneError(f"cpu_threads must be None or >= 1 (got {self.cpu_threads})")
        check_cache_memory(self.cache_memory)
        fraction = self.data_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not (0 < fraction <= 1)
        ):
            raise BioTuneError(f"data_fraction must be in (0, 1] (got {fraction!r})")
        k = round(1 / fraction)
        if not math.isclose(fraction, 1 / k, rel_tol=1e-6):
            raise BioTuneError(
                f"data_fraction must be 1/k for a whole number k of folds (1, 0.5, 1/3, 0.25, "
                f"...; got {fraction}, nearest 1/{k}); each evaluation trains on one fold"
            )
        if not self.seeds:
            raise BioTuneError("seeds must name at least one seed")
        if self.fold_policy not in FOLD_POLICIES:
            raise BioTuneError(
                f"fold_policy must be one of {', '.join(FOLD_POLICIES)} (got {self.fold_policy!r})"
            )

    @property
    def folds(self) -> int:
        """Disjoint stratified folds of the training split; generation g trains on fold g mod k.

        ``data_fraction`` is exactly 1/k (checked on creation), so a fold holds that share.
        """
        return round(1 / self.data_fraction)

    @property
    def comparable_across_generations(self) -> bool:
        """Whether scores of different generations come from the same fold and seeds."""
        return self.fold_policy == "fixed" or self.folds == 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["train"] = self.train.to_dict()
        if self.fold_policy == "rotate":  # stored only when set, so older run dirs resume
            del d["fold_policy"]
        if self.cache_memory == "auto":
            del d["cache_memory"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "protocol") -> SearchProtocol:
        """As stored in config.json, types checked (``checked_fields``); the ``cache_budget_mb``
        of older run directories is read as ``cache_memory``, the number it held."""
        if isinstance(d, dict) and "cache_budget_mb" in d:
            d = dict(d)
            old = d.pop("cache_budget_mb")
            if "cache_memory" in d:
                raise BioTuneError(
                    f"{where}: 'cache_budget_mb' is the old name of 'cache_memory': give one"
                )
            check_cache_memory(old, f"{where}.cache_budget_mb")
            d["cache_memory"] = old
        d = checked_fields(cls, d, where)
        for key in ("data_fraction", "seeds", "train", "memoize"):
            if key not in d:
                raise BioTuneError(f"{where}: '{key}' is missing (see a run's config.json)")
        prune = d.get("prune")
        return cls(
            data_fraction=d["data_fraction"],
            seeds=tuple(d["seeds"]),
            train=TrainConfig(**checked_fields(TrainConfig, d["train"], f"{where}.train")),
            memoize=d["memoize"],
            cache_features=d.get("cache_features", False),
            cache_memory=d.get("cache_memory", "auto"),
            prune=PruneConfig(**checked_fields(PruneConfig, prune, f"{where}.prune"))
            if prune
            else None,
            cpu_threads=d.get("cpu_threads"),
            fold_policy=d.get("fold_policy", "rotate"),
        )


class Evaluator:
    """Scores genomes for one model and dataset; holds the folds so every worker agrees on them.

    Each worker process builds its own evaluator, with its own feature cache; ``workers`` says
    how many share this machine's memory and ``per_gpu`` how many share one GPU (the "auto"
    cache budget is split between them).
    """

    def __init__(
        self,
        model: nn.Module,
        partition: BlockPartition,
        splits: DatasetSplits,
        protocol: SearchProtocol,
        fold_seed: int = 0,
        device: Any = None,
        workers: int = 1,
        per_gpu: int = 1,
    ) -> None:
        self.model = model
        self.partition = partition
        self.splits = splits
        self.protocol = protocol
        self.device = device or default_device()
        self.workers = workers
        self.per_gpu = per_gpu
        targets = np.asarray(splits.train.targets)
        self.folds = (
            [np.arange(len(targets))]
            if protocol.folds == 1
            else stratified_folds(targets, protocol.folds, fold_seed)
        )
        sample, _ = next(batches(splits.val, 2))
        self.flops = block_flops(model, partition, sample[0])
        self.cache, self.cache_status = self._make_cache(sample)

    def _make_cache(self, sample: torch.Tensor) -> tuple[FeatureCache | None, str]:
        """The feature cache, or None and why not (the reason goes into the run's summary)."""
        if not self.protocol.cache_features:
            return None, "off"
        if not self.protocol.train.frozen_eval:
            return None, "off: frozen blocks train in train mode (frozen_eval=False)"
        if self.protocol.train.augment:
            return None, "off: training augments its images"
        stages = block_chain(self.model, self.partition, sample)
        if stages is None:
            return None, f"off: cannot run {type(self.model).__name__} block by block"
        budget, origin = cache_budget(
            self.protocol.cache_memory, self.device, self.workers, self.per_gpu
        )
        train = self.protocol.train
        return FeatureCache(
            self.model,
            stages,
            budget,
            train.eval_batch_size,
            self.device,
            train.precision,
            train.channels_last,
            budget_origin=origin,
        ), "on"

    @property
    def ft_work(self) -> float:
        """One FT-equivalent for this model, data and epoch budget (the search's cost unit)."""
        return cost.ft_work(
            self.flops, len(self.splits.train), len(self.splits.val), self.protocol.train.epochs
        )

    def fold_of(self, generation: int) -> int:
        if self.protocol.fold_policy == "fixed":
            return 0
        return generation % len(self.folds)

    def hooks_for(
        self, candidate: int, seed: int, reference: list[list[float]] | None
    ) -> TrainHooks | None:
        """Early termination against ``reference``; none without a prune config or reference."""
        prune = self.protocol.prune
        if prune is None or not prune.enabled or not reference:
            return None
        last_seed = seed == self.protocol.seeds[-1]
        return PruneHooks(reference, prune, self.protocol.train.epochs - 1 if last_seed else None)

    def evaluate(
        self,
        candidate: int,
        genes: np.ndarray,
        generation: int,
        role: str = "",
        reference: list[list[float]] | None = None,
        train_config: TrainConfig | None = None,
    ) -> Evaluation:
        """Score one genome; ``reference`` holds validation curves of this generation's elites.

        A pruned seed ends the evaluation: its fitness is 1 - the mean best metric so far.
        ``train_config`` replaces the protocol's training (the middle rung's longer runs on the
        same fold and seeds); such a run is never pruned.
        """
        recipe = train_config or self.protocol.train
        genes = np.asarray(genes, dtype=float)
        plan = decode_genome(genes, self.partition.names)
        fold = self.fold_of(generation)
        seeds = list(self.protocol.seeds)
        start = time.perf_counter()
        if not genome_is_valid(genes):
            return Evaluation(
                candidate,
                generation,
                role,
                genes.tolist(),
                plan.to_dict(),
                fold,
                seeds,
                [],
                WORST_FITNESS,
                Status.INVALID,
                0.0,
                0,
                0,
                [],
            )
        train = subset(self.splits.train, self.folds[fold])
        scores, epochs, curves, status = [], [], [], "ok"
        train_images = eval_images = 0
        pruned_at = None
        with self._pinned_threads():
            before = self._cache_images()
            cached = self._cached(fold, train, plan.frozen_prefix)
            built = [a - b for a, b in zip(self._cache_images(), before, strict=True)]
            for seed in seeds:
                hooks = None if train_config else self.hooks_for(candidate, seed, reference)
                if cached is not None:
                    _, result = train_plan_cached(
                        self.model,
                        self.partition,
                        plan,
                        cached[0],
                        cached[1],
                        recipe,
                        seed=seed,
                        device=self.device,
                        hooks=hooks,
                    )
                else:
                    _, result = train_plan(
                        self.model,
                        self.partition,
                        plan,
                        train,
                        self.splits.val,
                        recipe,
                        seed=seed,
                        device=self.device,
                        hooks=hooks,
                    )
                curves.append([h[f"val_{recipe.metric}"] for h in result.history])
                train_images += result.train_images
                eval_images += result.eval_images
                epochs.append(result.epochs_run)
                if result.status != "ok":
                    status = result.status
                score = result.val.get(recipe.metric)
                scores.append(score if math.isfinite(score) else 0.0)
                if status == "pruned":
                    pruned_at = result.epochs_run
                if status in ("diverged", "pruned"):
                    break
        fitness = WORST_FITNESS if status == "diverged" else 1.0 - float(np.mean(scores))
        k = plan.frozen_prefix if cached is not None else 0
        work = cost.run_work(self.flops, k, plan.frozen_prefix, train_images, eval_images)
        return Evaluation(
            candidate,
            generation,
            role,
            genes.tolist(),
            plan.to_dict(),
            fold,
            seeds,
            scores,
            fitness,
            status,
            time.perf_counter() - start,
            train_images,
            eval_images,
            epochs,
            curves,
            work=work,
            cached_prefix=k,
            pruned_at=pruned_at,
            cache_work=cost.cache_work(self.flops, built),
            cache_images=sum(built),
        )

    def replay_cache(self, records: list[dict[str, Any]]) -> None:
        """Rebuild the feature cache of an interrupted invocation by replaying its evaluations'
        requests in order: the evaluations still to come then build (and count) what they would
        have without the interruption, so a resumed search costs what an uninterrupted one does."""
        if self.cache is None:
            return
        with self._pinned_threads():  # cached features depend on the thread count
            for rec in records:
                if rec.get("reused_from") is not None or rec["status"] in (
                    Status.INVALID,
                    Status.OVER_BUDGET,
                ):
                    continue
                plan = decode_genome(rec["genes"], self.partition.names)
                train = subset(self.splits.train, self.folds[rec["fold"]])
                self._cached(rec["fold"], train, plan.frozen_prefix)

    def _cache_images(self) -> list[int]:
        """Images the feature cache has pushed through each block so far (its own work)."""
        return list(self.cache.stage_images) if self.cache else [0] * len(self.flops)

    @contextlib.contextmanager
    def _pinned_threads(self) -> Iterator[None]:
        """Run with the protocol's CPU thread count (results depend on it), then restore."""
        threads = self.protocol.cpu_threads
        if threads is None or torch.device(self.device).type != "cpu":
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _cached(
        self, fold: int, train: Any, k: int
    ) -> tuple[FeatureDataset, FeatureDataset] | None:
        """Training fold and validation split after the first k (frozen) blocks, if cacheable."""
        if self.cache is None or k < 1:
            return None
        sizes = batch_sizes_for(len(train), self.protocol.train.batch_size)
        need = self.cache.entry_bytes(train, k, sizes) + self.cache.entry_bytes(self.splits.val, k)
        if need > self.cache.budget_bytes:
            self.cache.refuse(need)
            return None
        train_features = self.cache.features(("fold", fold), train, k, sizes)
        val_features = self.cache.features("val", self.splits.val, k)
        if train_features is None or val_features is None:
            return None
        return train_features, val_features
