"""What a search costs, in one unit: forward FLOPs of the model's blocks (numpy only).

Every block's forward FLOPs on one image are measured once (``biotune.measure.block_flops``). A
training image costs the forward of every block that actually runs (not the cached prefix) plus
twice the forward of the blocks from the first trained one on (backward); a validation image
costs the forward of the blocks that run; building a cached prefix costs its forward once per
image.

One FT-equivalent is the work of fine-tuning every block on the whole training split for the
protocol's epoch budget, validation after each epoch included:
``epochs * (3 * n_train + n_val) * total_flops``. The search's validation work is counted too,
so both sides of the ratio hold the same kinds of work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from biotune.core.records import Status

BACKWARD_FACTOR = 2.0  # a backward pass costs about twice the forward
_NOT_TRAINED = (Status.INVALID, Status.OVER_BUDGET)  # statuses of evaluations that never trained


def image_work(flops: Sequence[float], cached: int, first_trained: int) -> tuple[float, float]:
    """(training, validation) work per image for a run whose first ``cached`` blocks are cached."""
    forward = float(sum(flops[cached:]))
    return forward + BACKWARD_FACTOR * float(sum(flops[first_trained:])), forward


def run_work(
    flops: Sequence[float], cached: int, first_trained: int, train_images: int, eval_images: int
) -> float:
    """Work of one training run that saw ``train_images`` and validated ``eval_images``."""
    train, val = image_work(flops, cached, first_trained)
    return train * train_images + val * eval_images


def cache_work(flops: Sequence[float], stage_images: Sequence[int]) -> float:
    """Work of building cached prefixes: block i's forward once per image pushed through it."""
    return float(sum(f * n for f, n in zip(flops, stage_images, strict=True)))


def ft_work(flops: Sequence[float], n_train: int, n_val: int, epochs: int) -> float:
    """One FT-equivalent: full fine-tuning on the whole training split, validated every epoch."""
    return run_work(flops, 0, 0, n_train * epochs, n_val * epochs)


def ft_unit(epochs: int) -> str:
    """What one FT-equivalent of an ``epochs`` budget is, in words; a count of them is always
    quoted with its budget ("22.6 FT-eq (2 epochs)"), since units of different budgets differ."""
    return (
        f"full fine-tuning of the whole training split for {epochs} epoch"
        f"{'s' if epochs != 1 else ''}, validation included"
    )


def search_cost(
    evaluations: Sequence[dict[str, Any]], unit: float, wall_seconds: float | None = None
) -> dict[str, Any]:
    """A search's cost: raw image counts, work, FT-equivalents (``unit`` = ``ft_work``), time."""
    work = sum(e.get("work", 0.0) + e.get("cache_work", 0.0) for e in evaluations)
    by_status: dict[str, int] = defaultdict(int)
    for e in evaluations:
        by_status["memoised" if e.get("reused_from") is not None else e["status"]] += 1
    cost: dict[str, Any] = {
        "evaluations": len(evaluations),
        "trained": sum(
            1
            for e in evaluations
            if e["status"] not in _NOT_TRAINED and e.get("reused_from") is None
        ),
        "by_status": dict(sorted(by_status.items())),
        "cached": sum(1 for e in evaluations if e.get("cached_prefix", 0) > 0),
        "train_images": sum(e["train_images"] for e in evaluations),
        "eval_images": sum(e["eval_images"] for e in evaluations),
        "cache_images": sum(e.get("cache_images", 0) for e in evaluations),
        "work_flops": work,
        "ft_work_flops": unit,
        "ft_equivalents": work / unit if unit > 0 else float("nan"),
        "seconds": sum(e["seconds"] for e in evaluations),
    }
    if wall_seconds is not None:
        cost["wall_seconds"] = wall_seconds
    return cost
