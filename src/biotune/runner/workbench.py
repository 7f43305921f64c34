"""The model, its blocks and the data every evaluation starts from, and what is built on them:
the evaluator that scores genomes, the budget's plan costs, the partition's fingerprint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from biotune.blocks import BlockPartition, partition_blocks
from biotune.core.budget import SearchBudget
from biotune.core.plan import FineTunePlan
from biotune.data import DEMO_IMAGE_SIZE, DEMO_SIZES, DatasetSplits, is_offline, load_dataset
from biotune.features import FeatureCache, block_chain, cache_budget, train_plan_fast
from biotune.inputs import fingerprint
from biotune.measure import PlanCosts
from biotune.models import LoadedModel, load_model
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.fitness import Evaluator
from biotune.training import TrainConfig, TrainHooks, TrainResult, batches, default_device


@dataclass
class Workbench:
    """The loaded model, its blocks and the data: what every evaluation starts from."""

    loaded: LoadedModel
    partition: BlockPartition
    splits: DatasetSplits
    _caches: dict[tuple, FeatureCache | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def feature_cache(self, config: TrainConfig) -> FeatureCache | None:
        """One feature cache of the pretrained model for every training on the whole splits, so
        several seeds, methods and plans share the frozen prefixes; None if the model cannot run
        block by block. Its budget is "auto" (``features.cache_budget``): these trainings run
        one at a time in this process."""
        key = (config.eval_batch_size, config.precision, config.channels_last)
        if key not in self._caches:
            sample, _ = next(batches(self.splits.val, 2))
            stages = block_chain(self.model, self.partition, sample)
            device = default_device()
            self._caches[key] = None
            if stages is not None:
                budget, origin = cache_budget("auto", device)
                self._caches[key] = FeatureCache(
                    self.model,
                    stages,
                    budget,
                    config.eval_batch_size,
                    device,
                    config.precision,
                    config.channels_last,
                    budget_origin=origin,
                )
        return self._caches[key]

    def train(
        self,
        plan: FineTunePlan,
        config: TrainConfig,
        seed: int = 0,
        device: torch.device | None = None,
        hooks: TrainHooks | None = None,
    ) -> tuple[torch.nn.Module, TrainResult, int]:
        """A copy of the model trained under ``plan`` on the whole training split (validation for
        early stopping), on cached features of its frozen prefix when it can: the trained model,
        its result and how many blocks came from the cache (final trainings, baselines)."""
        return train_plan_fast(
            self.model,
            self.partition,
            plan,
            self.splits.train,
            self.splits.val,
            config,
            seed=seed,
            device=device,
            cache=self.feature_cache(config) if config.frozen_eval else None,
            hooks=hooks,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Workers get the model and data, not features cached here."""
        return {**self.__dict__, "_caches": {}}


def split_sizes(data: DataConfig) -> tuple[int | None, int | None, int | None]:
    """The train / val / test caps in force: the ones given, else the demo caps for the offline
    datasets and the whole splits for everything else (a user's folder is used whole)."""
    if data.full_data:
        return (None, None, None)
    given = (data.train_size, data.val_size, data.test_size)
    if not is_offline(data.dataset):
        return given
    return tuple(g if g is not None else d for g, d in zip(given, DEMO_SIZES, strict=True))


def image_size_for(data: DataConfig, native: int, native_name: str) -> tuple[int, str]:
    """The image side in force and why: the one given, else the model's native resolution
    (``native``, described as ``native_name``), as timm and torchvision size a user's photos;
    only the offline demo datasets default to 32 px, so that the demo runs on a CPU in minutes."""
    if data.image_size is not None:
        if data.image_size == native:
            return native, native_name
        return data.image_size, f"as given ({native_name}: {native} px)"
    if is_offline(data.dataset):
        return DEMO_IMAGE_SIZE, (
            f"the offline demo datasets' size ({native_name}: {native} px, --native-size)"
        )
    return native, f"{native_name}; --image-size N to change it"


def architecture_blocks(data: DataConfig) -> BlockPartition:
    """The model's blocks from its architecture alone (random weights: nothing is downloaded or
    read), so that a plan made for another model is refused before anything loads."""
    probe = load_model(data.model, num_classes=2, pretrained=False)
    return partition_blocks(probe.model, data.blocks)


def prepare(data: DataConfig) -> Workbench:
    """Load the model and the data, sized and normalised for each other, and split the blocks."""
    probe = load_model(data.model, num_classes=2, pretrained=False)
    size, size_origin = image_size_for(data, probe.input_size, f"{probe.name}'s native resolution")
    train_size, val_size, test_size = split_sizes(data)
    splits = load_dataset(
        data.dataset,
        size,
        probe.mean,
        probe.std,
        root=data.data_root,
        seed=data.split_seed,
        train_size=train_size,
        val_size=val_size,
        test_size=test_size,
        download=data.download,
        bad_images=data.bad_images,
    )
    splits.size_origin = size_origin
    loaded = load_model(
        data.model,
        num_classes=len(splits.classes),
        pretrained=data.pretrained,
        checkpoint=data.checkpoint,
    )
    return Workbench(loaded, partition_blocks(loaded.model, data.blocks), splits)


def search_budget(
    bench: Workbench, config: SearchConfig, flops: Sequence[float]
) -> SearchBudget | None:
    """The budget of a search on ``bench`` (a ``Workbench``) by ``config`` (its
    ``SearchConfig``), its feasibility checked; None for a search with neither budget nor
    Pareto objective: nothing is checked or measured, so it runs and records as before."""
    objective = config.evolution.objective
    if not config.budget.limited and objective != "pareto":
        return None
    sample, _ = next(batches(bench.splits.val, 4))
    costs = PlanCosts(
        bench.model, bench.partition, sample, flops, config.final.batch_size, config.final.optimizer
    )
    budget = SearchBudget(config.budget, costs, objective)
    budget.check_feasible()
    return budget


def evaluator_for(
    bench: Workbench, config: SearchConfig, workers: int = 1, per_gpu: int = 1
) -> Evaluator:
    """Scores genomes on ``bench``'s model and data by ``config``'s protocol and folds;
    ``workers``: how many evaluators share this machine's memory, ``per_gpu``: how many share one
    GPU (the cache budget's split)."""
    return Evaluator(
        bench.model,
        bench.partition,
        bench.splits,
        config.protocol,
        fold_seed=config.seed,
        workers=workers,
        per_gpu=per_gpu,
    )


def build_evaluator(config: SearchConfig, workers: int = 1, per_gpu: int = 1) -> Evaluator:
    """Everything a worker process needs to score genomes, rebuilt from the configuration."""
    return evaluator_for(prepare(config.data), config, workers, per_gpu)


def partition_record(bench: Workbench) -> dict[str, Any]:
    """The blocks, each fingerprinted by its name and its parameters' names and shapes."""
    shapes = {name: list(p.shape) for name, p in bench.model.named_parameters()}
    blocks = bench.partition.to_dict()["blocks"]
    for block in blocks:
        params = [[name, shapes.get(name)] for name in block["param_names"]]
        block["fingerprint"] = fingerprint([block["name"], params])
    return {"fingerprint": fingerprint([b["fingerprint"] for b in blocks]), "blocks": blocks}
