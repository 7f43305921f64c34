"""Stratified splits and folds, pure numpy: every split keeps the class proportions of the whole.

The class x split table of counts is rounded so that every entry is within one of its
proportional share and rows and columns add up exactly (controlled rounding); then each class's
items are dealt out at random. Used for the train / val / test splits of datasets without an
official split, for subsamples, for the validation part carved out of a training split, and for
the folds the search rotates through (``stratified_folds``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from biotune.errors import BioTuneError

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, for datasets without an official split


def round_preserving_margins(
    counts: np.ndarray, sizes: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Class x split table of counts: every entry within 1 of its proportional share, with rows
    summing to the class counts and columns to the split sizes exactly (controlled rounding)."""
    counts = np.asarray(counts, dtype=np.int64)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    total = int(counts.sum())
    numerators = np.outer(counts, sizes_arr)
    table = numerators // total
    eligible = (numerators % total) > 0  # entries that may round up
    row_need = counts - table.sum(axis=1)
    col_left = sizes_arr - table.sum(axis=0)
    up = np.zeros_like(eligible)
    for row in rng.permutation(len(counts)):
        for _ in range(int(row_need[row])):
            _augment(int(row), up, eligible, col_left, rng)
    return table + up


def _augment(
    row: int, up: np.ndarray, eligible: np.ndarray, col_left: np.ndarray, rng: np.random.Generator
) -> None:
    """Give ``row`` one more round-up, moving other rows' round-ups along an augmenting path
    (a bipartite b-matching; a solution always exists because the real-valued table is one)."""
    parent: dict[int, tuple[int, int | None]] = {}
    frontier = []
    for col in rng.permutation(up.shape[1]):
        if eligible[row, col] and not up[row, col]:
            parent[int(col)] = (row, None)
            frontier.append(int(col))
    while frontier:
        col = frontier.pop(0)
        if col_left[col] > 0:
            col_left[col] -= 1
            while True:
                mover, source = parent[col]
                up[mover, col] = True
                if source is None:
                    return
                up[mover, source] = False
                col = source
        for other in np.flatnonzero(up[:, col]):
            for target in rng.permutation(up.shape[1]):
                target = int(target)
                if target not in parent and eligible[other, target] and not up[other, target]:
                    parent[target] = (int(other), col)
                    frontier.append(target)
    raise AssertionError("controlled rounding found no augmenting path")


def stratified_split(
    targets: np.ndarray, sizes: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint index arrays of the given sizes covering all items, each stratified by class."""
    labels, inverse = np.unique(targets, return_inverse=True)
    table = round_preserving_margins(np.bincount(inverse, minlength=len(labels)), sizes, rng)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(len(labels)):
        members = rng.permutation(np.flatnonzero(inverse == c))
        bounds = np.concatenate([[0], np.cumsum(table[c])])
        for j in range(len(sizes)):
            parts[j].append(members[bounds[j] : bounds[j + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def default_split_sizes(n: int) -> list[int]:
    """Train / val / test sizes of ``n`` items by ``SPLIT_FRACTIONS`` (60 / 20 / 20)."""
    val, test = round(n * SPLIT_FRACTIONS[1]), round(n * SPLIT_FRACTIONS[2])
    return [n - val - test, val, test]


def carve(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off a stratified validation part of a training split: (carved, rest)."""
    n = len(targets)
    carved = max(1, round(n * fraction))
    rng = np.random.default_rng([seed, 1])
    first, rest = stratified_split(targets, [carved, n - carved], rng)
    return first, rest


def stratified_sample(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified subsample of ``n`` items (all of them, in order, if n is all)."""
    if n == len(targets):
        return np.arange(n)
    return stratified_split(targets, [n, len(targets) - n], rng)[0]


def stratified_folds(targets: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index arrays covering all items, each with the class proportions of the whole
    (the search trains each evaluation on one fold, rotating with the generation)."""
    targets = np.asarray(targets)
    if k < 1 or k > len(targets):
        raise BioTuneError(f"cannot make {k} folds of {len(targets)} items")
    if k == 1:
        return [np.arange(len(targets))]
    sizes = [len(targets) // k + (1 if j < len(targets) % k else 0) for j in range(k)]
    return stratified_split(targets, sizes, np.random.default_rng([seed, 2]))
