"""The Python front door: search a plan, or train one, on a named or your own model and data.

``model`` is a name (``"efficientnet_lite0"``, ``"tv:resnet50"``, ``"timm:..."``) or an
``nn.Module`` whose last layer has one output per class. That layer (the last block, the new
head) is re-drawn per seed, every parameter of it: one you froze (``requires_grad=False``) is
re-drawn too and stays frozen, so keep pretrained values you want outside the head. The data
is a dataset name or folder (``dataset=``), one ``Dataset`` to split 60 / 20 / 20, or
``train=`` / ``val=`` (/ ``test=``) Datasets of (image tensor, label) pairs, ``.targets`` or
not. ``blocks=`` overrides the block
partition (block name -> module prefixes or regexes, in order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from biotune.errors import BioTuneError
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.search import SearchResult
from biotune.runner.workbench import Workbench


def workbench(
    data: DataConfig,
    *,
    model: str | nn.Module | None = None,
    dataset: str | Dataset | None = None,
    train: Dataset | None = None,
    val: Dataset | None = None,
    test: Dataset | None = None,
    classes: list[str] | None = None,
) -> tuple[Workbench, DataConfig]:
    """The model and data to work on, and the ``DataConfig`` that describes them in a run's
    ``config.json`` (``user:...`` names where objects were given)."""
    from biotune.blocks import partition_blocks
    from biotune.data import load_dataset
    from biotune.inputs import check_blocks, user_model, user_splits
    from biotune.models import load_model
    from biotune.runner.workbench import image_size_for, prepare, split_sizes

    if data.blocks is not None:
        data = replace(data, blocks=check_blocks(data.blocks))
    if isinstance(model, str):
        data = replace(data, model=model)
    if isinstance(dataset, str | Path):
        data = replace(data, dataset=str(dataset))
    elif dataset is not None:
        if train is not None or val is not None:
            raise BioTuneError("give dataset= (split for you) or train=/val=, not both")
        train = dataset
    user_model_given = isinstance(model, nn.Module)
    if model is not None and not isinstance(model, str | nn.Module):
        raise BioTuneError(f"model must be a name or an nn.Module, got {type(model).__name__}")
    if train is None and (val is not None or test is not None):
        raise BioTuneError("val= and test= need train= as well")
    if train is None and not user_model_given:
        return prepare(data), data

    if train is not None:
        splits = user_splits(train, val, test, classes=classes, seed=data.split_seed)
        data = replace(
            data,
            dataset=f"user:{type(train).__name__}",
            image_size=splits.image_size,
            train_size=None,
            val_size=None,
            test_size=None,
        )
        mean = std = None
    else:  # a user model on a named dataset: ImageNet normalisation and size (no config to ask)
        from biotune.models import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        sizes = split_sizes(data)
        size, size_origin = image_size_for(data, 224, "ImageNet's usual size for a model object")
        splits = load_dataset(
            data.dataset,
            size,
            mean,
            std,
            root=data.data_root,
            seed=data.split_seed,
            train_size=sizes[0],
            val_size=sizes[1],
            test_size=sizes[2],
            download=data.download,
            bad_images=data.bad_images,
        )
        splits.size_origin = size_origin
    sample = splits.val[0][0]
    if user_model_given:
        loaded = user_model(model, len(splits.classes), sample, mean=mean, std=std)
        data = replace(data, model=loaded.name, pretrained=False, checkpoint=None)
    else:
        loaded = load_model(
            data.model,
            num_classes=len(splits.classes),
            pretrained=data.pretrained,
            checkpoint=data.checkpoint,
        )
    return Workbench(loaded, partition_blocks(loaded.model, data.blocks), splits), data


def scaled(
    config: SearchConfig,
    population: int | None = None,
    generations: int | None = None,
    epochs: int | None = None,
    final_epochs: int | None = None,
    final_seeds: Sequence[int] | None = None,
    max_ft_equivalents: float | None = None,
) -> SearchConfig:
    """``config`` made smaller or larger (None keeps a value); patience never exceeds epochs.
    ``max_ft_equivalents`` is what the evaluations may cost (the default preset's random search
    stops there; see ``SearchConfig``)."""
    evolution, protocol, final = config.evolution, config.protocol, config.final
    if max_ft_equivalents is not None:
        config = replace(config, max_ft_equivalents=max_ft_equivalents)
    if population is not None:
        evolution = evolution.resized(population)
    if generations is not None:
        evolution = replace(evolution, generations=generations)
    if epochs is not None:
        train = protocol.train
        train = replace(train, epochs=epochs, patience=min(train.patience, epochs))
        protocol = replace(protocol, train=train)
    if final_epochs is not None:
        final = replace(final, epochs=final_epochs, patience=min(final.patience, final_epochs))
    seeds = tuple(final_seeds) if final_seeds is not None else config.final_seeds
    return replace(config, evolution=evolution, protocol=protocol, final=final, final_seeds=seeds)


def search(
    run_dir: str | Path,
    config: SearchConfig | None = None,
    *,
    preset: str = "default",
    model: str | nn.Module | None = None,
    dataset: str | Dataset | None = None,
    train: Dataset | None = None,
    val: Dataset | None = None,
    test: Dataset | None = None,
    classes: list[str] | None = None,
    blocks: dict[str, list[str]] | None = None,
    resume: bool = False,
    final: bool = True,
    executor: str = "inprocess",
    workers: int = 1,
    ray_address: str | None = None,
    per_gpu: int = 1,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    objective: str | None = None,
    max_trainable: float | None = None,
    max_memory_mb: float | None = None,
    population: int | None = None,
    generations: int | None = None,
    epochs: int | None = None,
    final_epochs: int | None = None,
    final_seeds: Sequence[int] | None = None,
    max_ft_equivalents: float | None = None,
    **data: Any,
) -> SearchResult:
    """Search a fine-tuning plan (then train and test it, and save the model, unless
    ``final=False``).

    ``data`` overrides fields of :class:`DataConfig` (``image_size=``, ``train_size=``, ...) of
    ``config`` or of the named preset ("default", "evolution" or "paper"). A search is made
    smaller or larger by ``max_ft_equivalents`` (what its evaluations may cost; the default's
    random search stops there), ``population``, ``generations`` and ``epochs`` (at most, per
    evaluation), its final training by ``final_epochs`` and ``final_seeds``; every other
    setting goes through ``config`` (a :class:`SearchConfig`, e.g. a preset changed with
    ``dataclasses.replace``).
    ``callbacks`` watch the search (:mod:`biotune.callbacks`). ``executor`` ("inprocess",
    "process" or "ray"), ``workers`` and ``per_gpu`` (evaluations sharing each GPU) say where
    evaluations run, which changes their speed, not what they compute (on a GPU no run is
    bit-identical to another anyway: cuDNN's autotuned kernels, atomic adds). ``max_trainable``
    (a share: 0.1 is 10 % of the parameters) and ``max_memory_mb`` are budgets no trained plan
    exceeds; ``objective="pareto"`` returns the front of accuracy against cost
    (``result.pareto``); the other settings of :class:`biotune.core.budget.BudgetConfig` go
    through ``config.budget``.
    """
    from biotune.presets import preset as named_preset
    from biotune.progress import SearchProgress
    from biotune.runner.search import Search

    config = scaled(
        config or named_preset(preset),
        population,
        generations,
        epochs,
        final_epochs,
        final_seeds,
        max_ft_equivalents,
    )
    budget = {
        k: v
        for k, v in (("max_trainable", max_trainable), ("max_memory_mb", max_memory_mb))
        if v is not None
    }
    if budget:
        config = replace(config, budget=replace(config.budget, **budget))
    if objective is not None:
        config = replace(config, evolution=replace(config.evolution, objective=objective))
    if blocks is not None:
        data["blocks"] = blocks
    bench, described = workbench(
        replace(config.data, **data),
        model=model,
        dataset=dataset,
        train=train,
        val=val,
        test=test,
        classes=classes,
    )
    config = replace(config, data=described)
    runner = Search(
        config,
        run_dir,
        bench=bench,
        progress=SearchProgress.for_search(config) if progress else None,
        callbacks=callbacks,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        per_gpu=per_gpu,
    )
    return runner.run_search(resume=resume, final=final)


def train(
    plan: Any,
    *,
    model: str | nn.Module | None = None,
    dataset: str | Dataset | None = None,
    train: Dataset | None = None,
    val: Dataset | None = None,
    test: Dataset | None = None,
    classes: list[str] | None = None,
    blocks: dict[str, list[str]] | None = None,
    config: Any = None,
    seed: int = 0,
    save: str | Path | None = None,
    **data: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune under ``plan`` (a ``FineTunePlan``, its dict as in a ``best_plan.json``, such
    a file's path, "full" or "head") with the final recipe; returns the trained model and its
    scores (test included when there is a test split). ``save``: write the model there (see
    :mod:`biotune.finetuned`). The plan is checked before anything loads.
    """
    from biotune.core.plan import FineTunePlan
    from biotune.presets import FINAL_TRAINING
    from biotune.runner.final import final_training_run, save_model

    if isinstance(plan, dict):
        plan = FineTunePlan.from_dict(plan)
    elif isinstance(plan, str | Path) and plan not in ("full", "head"):
        plan = FineTunePlan.load(plan)
    elif not isinstance(plan, FineTunePlan | str):
        raise BioTuneError(
            "plan must be a FineTunePlan, a plan dict ({'blocks': [...]}), a best_plan.json "
            f"path, 'full' or 'head' (got {type(plan).__name__})"
        )
    if blocks is not None:
        data["blocks"] = blocks
    bench, described = workbench(
        DataConfig(**data),
        model=model,
        dataset=dataset,
        train=train,
        val=val,
        test=test,
        classes=classes,
    )
    names = bench.partition.names
    if isinstance(plan, str):
        plan = FineTunePlan.full(names) if plan == "full" else FineTunePlan.head_only(names)
    plan.check_fits(bench.partition)
    config = config or FINAL_TRAINING
    trained, run = final_training_run(bench, plan, config, seed, keep_model=True)
    if save is not None:
        save_model(save, trained, bench, described, plan, config, run)
    return trained, run.to_dict()
