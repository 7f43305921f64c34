"""The final training: the chosen plan trained on the whole training split per seed, with early
stopping on validation, tested once; the best seed's model saved with what it takes to use it.

``final_training_run`` is the one recipe for every plan trained at the end of a search (the
winner, the re-ranked plans, the Pareto front and the anchors) and for ``biotune train``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from biotune.callbacks import emit
from biotune.core.plan import FineTunePlan
from biotune.core.records import FinalRun
from biotune.data import is_offline
from biotune.runner.config import DataConfig
from biotune.runner.rundir import FINAL
from biotune.runner.workbench import Workbench, partition_record
from biotune.training import (
    EpochEvents,
    TrainConfig,
    TrainHooks,
    count_parameters,
    default_device,
    evaluate,
)

if TYPE_CHECKING:
    from biotune.runner.search import Search


def train_final(search: Search, plan: FineTunePlan) -> dict[str, Any]:
    """Train the plan on the whole training split per seed (resumable), test each once.

    The seed best on validation so far is saved as the run's fine-tuned model (before its
    record, so a crash in between retrains that seed rather than losing its model).
    """
    assert search.bench is not None
    runs = search.run.final_runs()
    best = max(runs.values(), key=lambda r: r.val_balanced, default=None)
    for seed in search.config.final_seeds:
        if seed in runs:
            continue
        model, run = final_training_run(
            search.bench,
            plan,
            search.config.final,
            seed,
            keep_model=True,
            callbacks=search.callbacks,
        )
        if best is None or run.val_balanced > best.val_balanced:
            save_model(
                search.run.path,
                model,
                search.bench,
                search.config.data,
                plan,
                search.config.final,
                run,
            )
            best = run
        search.run.append_final_run(run)
        runs[seed] = run
    summary = summarize_final([runs[s] for s in search.config.final_seeds], plan, search.bench)
    if best is not None:
        summary["model"] = {"seed": best.seed, "files": ["model.safetensors", "finetuned.json"]}
    search.run.write(FINAL, summary)
    return summary


def final_training_run(
    bench: Workbench,
    plan: FineTunePlan,
    config: TrainConfig,
    seed: int,
    keep_model: bool = False,
    callbacks: Sequence[Any] = (),
    hooks: TrainHooks | None = None,
) -> Any:
    """Fine-tune under ``plan`` on the whole training split; early stopping on val; test once.

    A plan that freezes the first blocks trains on their cached features (as the search does).
    Returns the ``FinalRun``, or (trained model, ``FinalRun``) with ``keep_model``. Without a
    test split the test scores are None. ``callbacks`` hear ``on_final_start``,
    ``on_final_epoch`` and ``on_final_run`` (``biotune.callbacks``; the record as a dict);
    a run that is not a final one (re-ranking) passes its own epoch ``hooks`` instead.
    """
    emit(callbacks, "on_final_start", seed, config.epochs)
    if hooks is None and callbacks:
        hooks = EpochEvents(callbacks, "on_final_epoch", seed)
    model, result, cached = bench.train(plan, config, seed, default_device(), hooks=hooks)
    test = (
        evaluate(
            model,
            bench.splits.test,
            config.eval_batch_size,
            default_device(),
            config.precision,
            config.channels_last,
        )
        if bench.splits.test is not None
        else None
    )
    run = FinalRun(
        seed=seed,
        test_top1=test.top1 if test else None,
        test_balanced=test.balanced if test else None,
        val_top1=result.val.top1,
        val_balanced=result.val.balanced,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        seconds=result.seconds,
        train_images=result.train_images,
        eval_images=result.eval_images,
        cached_prefix=cached,
        status=result.status,
        trainable_params=count_parameters(model, trainable_only=True),
    )
    emit(callbacks, "on_final_run", run.to_dict())
    return (model, run) if keep_model else run


def save_model(
    directory: str | Path,
    model: torch.nn.Module,
    bench: Workbench,
    data: DataConfig,
    plan: FineTunePlan,
    config: TrainConfig,
    run: FinalRun,
) -> Path:
    """Write a trained model with what it takes to use it (``biotune.finetuned``)."""
    from biotune.finetuned import Preprocess, save_finetuned

    user_data = data.dataset.startswith("user:")
    preprocess = (
        None
        if user_data
        else Preprocess(
            bench.splits.image_size,
            bench.loaded.mean,
            bench.loaded.std,
            "squash" if is_offline(data.dataset) else "crop",
        )
    )
    details = {
        "plan": plan.to_dict(),
        "plan_text": plan.describe(),
        "base_lr": config.base_lr,
        "partition": partition_record(bench),
        "data": {**asdict(data), "splits": bench.splits.describe()},
        "scores": {
            k: getattr(run, k) for k in ("val_top1", "val_balanced", "test_top1", "test_balanced")
        },
        "seed": run.seed,
        "trainable_params": run.trainable_params,
    }
    return save_finetuned(
        directory,
        model,
        architecture=bench.loaded.name,
        classes=bench.splits.classes,
        preprocess=preprocess,
        details=details,
    )


def summarize_final(
    runs: Sequence[FinalRun], plan: FineTunePlan, bench: Workbench
) -> dict[str, Any]:
    """Mean and spread over the seeds' runs of each score, what the plan trains, the runs."""

    def stat(key: str) -> dict[str, float] | None:
        if any(getattr(r, key) is None for r in runs):
            return None  # no test split
        values = np.array([getattr(r, key) for r in runs], dtype=float)
        return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}

    trained = runs[0].trainable_params if runs else 0  # parameters the user froze excluded
    total = count_parameters(bench.model)
    return {
        "plan": plan.to_dict(),
        "test_top1": stat("test_top1"),
        "test_balanced": stat("test_balanced"),
        "val_balanced": stat("val_balanced"),
        "trainable_params": trained,
        "trainable_share": trained / total,
        "seconds": float(sum(r.seconds for r in runs)),
        "runs": [r.to_dict() for r in runs],
        "machine": machine_description(),
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"
