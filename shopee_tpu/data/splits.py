"""Seeded, stratified splits that keep every group (a product, say) on one side.

Images of one product are near-duplicates; if they land in both training and
validation, validation accuracy is inflated. Both functions here assign whole groups
greedily: groups are visited largest first (ties in a seeded random order) and each
goes to the fold whose share of the group's classes is furthest below its target.
This keeps class proportions close to equal across folds while never splitting a
group. Only numpy's ``default_rng`` (PCG64) is used, so a seed gives the same split
on any machine and numpy version that keeps that generator stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["group_split", "stratified_group_kfold", "assign_groups"]


def _codes(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=object) if values is not None else None
    if arr is None:
        return np.arange(n)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but labels has {n}")
    _, codes = np.unique(arr.astype(str), return_inverse=True)
    return codes.reshape(-1)


def assign_groups(
    labels: Sequence,
    groups: Sequence | None,
    weights: Sequence[float],
    seed: int,
) -> np.ndarray:
    """Assigns every sample to one of ``len(weights)`` folds, whole groups at a time.

    Args:
        labels: Class of each sample (any hashable values).
        groups: Group of each sample; ``None`` makes every sample its own group.
        weights: Target share of each fold (normalised here).
        seed: Seed for the visiting order of equal-sized groups and for ties.

    Returns:
        An int array: the fold of each sample.
    """
    n = len(labels)
    if n == 0:
        return np.zeros(0, np.int64)
    target = np.asarray(weights, np.float64)
    if target.ndim != 1 or len(target) < 1 or np.any(target <= 0):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    target = target / target.sum()
    k = len(target)
    y = _codes(labels, n, "labels")
    g = _codes(groups, n, "groups")
    n_classes, n_groups = int(y.max()) + 1, int(g.max()) + 1
    # Class counts of every group, as a sparse list per group.
    counts = np.zeros((n_groups, n_classes), np.int64)
    np.add.at(counts, (g, y), 1)
    class_total = counts.sum(axis=0).astype(np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts.sum(axis=1)[order], kind="stable")]
    fold_counts = np.zeros((k, n_classes), np.float64)
    fold_total = np.zeros(k, np.float64)
    jitter = rng.random((n_groups, k)) * 1e-9
    group_fold = np.empty(n_groups, np.int64)
    for gi in order:
        cls = np.flatnonzero(counts[gi])
        c = counts[gi, cls]
        # Fill of each fold for this group's classes after adding it, relative to the
        # fold's target; the total size breaks ties between equally filled folds.
        fill = ((fold_counts[:, cls] + c) / (target[:, None] * class_total[cls])) @ c
        size = (fold_total + c.sum()) / (target * n)
        best = int(np.argmin(fill / c.sum() + 1e-3 * size + jitter[gi]))
        group_fold[gi] = best
        fold_counts[best, cls] += c
        fold_total[best] += c.sum()
    return group_fold[g]


def stratified_group_kfold(
    labels: Sequence, groups: Sequence | None, n_splits: int, seed: int
) -> np.ndarray:
    """Stratified group k-fold: the fold (0..n_splits-1) of every sample.

    Args:
        labels: Class of each sample.
        groups: Group of each sample (``None``: each sample is its own group).
        n_splits: Number of folds.
        seed: Seed; the same seed gives the same folds on any machine.

    Returns:
        An int array of fold indices, one per sample.
    """
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    return assign_groups(labels, groups, [1.0] * n_splits, seed)


def group_split(
    labels: Sequence, groups: Sequence | None, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/validation split by group, stratified by class.

    Args:
        labels: Class of each sample.
        groups: Group of each sample (``None``: each sample is its own group).
        valid_fraction: Target share of samples in validation, in (0, 1).
        seed: Seed; the same seed gives the same split on any machine.

    Returns:
        ``(train_idx, valid_idx)``: sorted index arrays; no group is in both.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    fold = assign_groups(labels, groups, [1 - valid_fraction, valid_fraction], seed)
    return np.flatnonzero(fold == 0), np.flatnonzero(fold == 1)
