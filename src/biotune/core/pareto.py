"""Pareto fronts of validation error against a plan's cost, compared within one fold only.

A plan dominates another when it is no worse in both error (1 - validation score) and cost
(trainable share or training memory) and better in one. Validation scores measured on different
folds are never compared (the defect of the authors' code this project corrects), so every
function here takes points of one fold, and :func:`fold_front` picks a fold's records first.

Pure numpy, like the evolution that ranks its generations with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Point = tuple[float, float]  # (error, cost): both lower is better


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in error and cost, and better in at least one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def non_dominated(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates, in input order (equal points all stay)."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def front_ranks(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting: 0 for the front, 1 for the front of the rest, and so on."""
    ranks = [-1] * len(points)
    left = list(range(len(points)))
    rank = 0
    while left:
        front = [left[k] for k in non_dominated([points[i] for i in left])]
        for i in front:
            ranks[i] = rank
        left = [i for i in left if ranks[i] < 0]
        rank += 1
    return ranks


def crowding(points: Sequence[Point]) -> list[float]:
    """Crowding distance of each point within its set (NSGA-II): the two ends of each objective
    get infinity, the others the normalised gap between their neighbours, summed over both."""
    n = len(points)
    distance = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for axis in (0, 1):
        order = sorted(range(n), key=lambda i: (points[i][axis], i))
        low, high = points[order[0]][axis], points[order[-1]][axis]
        distance[order[0]] = distance[order[-1]] = math.inf
        span = high - low
        if span <= 0 or not math.isfinite(span):
            continue
        for k in range(1, n - 1):
            gap = points[order[k + 1]][axis] - points[order[k - 1]][axis]
            distance[order[k]] += gap / span
    return distance


def pareto_order(points: Sequence[Point], tiebreak: Sequence[int] | None = None) -> list[int]:
    """Indices best first: by front rank, then the least crowded (the ends of each front first),
    then the lower error, then ``tiebreak`` (candidate ids), so the order is deterministic."""
    tiebreak = list(range(len(points))) if tiebreak is None else list(tiebreak)
    ranks = front_ranks(points)
    spread = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for i, d in zip(members, crowding([points[i] for i in members]), strict=True):
            spread[i] = d
    return sorted(
        range(len(points)), key=lambda i: (ranks[i], -spread[i], points[i][0], tiebreak[i])
    )


def spread_along(costs: Sequence[float], n: int | None) -> list[int]:
    """``n`` indices spread along a front from its cheapest to its dearest member (all if None
    or n >= the front's size): the ends, then those nearest to evenly spaced positions."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    if n is None or n >= len(order):
        return order
    if n <= 0:
        return []
    picks = sorted({order[round(k)] for k in np.linspace(0, len(order) - 1, n)})
    return sorted(picks, key=lambda i: (costs[i], i))


def fold_front(
    records: Iterable[Mapping[str, Any]], fold: int, cost_key: str
) -> list[dict[str, Any]]:
    """The non-dominated trained plans among a search's evaluation records of one fold.

    Only records scored on ``fold`` compete, whatever their generation: scores of one fold come
    from the same data and seeds, so they compare; scores of other folds never enter. Records
    that did not train to the end (invalid, over budget, diverged, pruned) or carry no cost
    are left out; a plan recorded twice (memoised, or retrained) counts once, its first record,
    and so do plans with equal scores and costs. Returned cheapest first.
    """
    seen: set[str] = set()
    candidates: list[dict[str, Any]] = []
    for rec in records:
        cost = (rec.get("cost") or {}).get(cost_key)
        if rec.get("status") != "ok" or rec.get("fold") != fold or cost is None:
            continue
        key = plan_key(rec["plan"])
        if key in seen:
            continue
        seen.add(key)
        candidates.append(dict(rec))
    points = [(float(r["fitness"]), float(r["cost"][cost_key])) for r in candidates]
    front, kept = [], set()
    for i in non_dominated(points):
        if points[i] not in kept:  # plans that tie in both count once: the first evaluated
            kept.add(points[i])
            front.append(candidates[i])
    return sorted(front, key=lambda r: (r["cost"][cost_key], r["fitness"], r["candidate"]))


def plan_key(plan: Mapping[str, Any], digits: int = 6) -> str:
    """A plan's identity as text (the blocks trained and their rounded multipliers), as
    ``FineTunePlan.key`` has it: plans with one key train identically."""
    parts = [
        f"{b['name']}:{round(float(b['lr_mult']), digits)!r}" if b["train"] else f"{b['name']}:-"
        for b in plan["blocks"]
    ]
    return "|".join(parts)
