"""Grouped, stratified, seeded splits."""

from __future__ import annotations

import numpy as np
import pytest

from shopee_tpu.data.splits import group_split, stratified_group_kfold


def _data(seed=0, n_groups=400, classes=6):
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        # Long-tailed classes, products of 1-4 images; one product in 20 mixes two
        # classes (mislabelled images exist in Shopee).
        c = int(min(classes - 1, rng.geometric(0.35) - 1))
        for k in range(int(rng.integers(1, 5))):
            labels.append(c if k or g % 20 else (c + 1) % classes)
            groups.append(f"prod{g}")
    return np.array(labels), np.array(groups)


def test_group_split_keeps_groups_whole_and_is_stratified():
    labels, groups = _data()
    train, valid = group_split(labels, groups, 0.2, seed=1)
    assert len(np.intersect1d(train, valid)) == 0
    assert len(train) + len(valid) == len(labels)
    assert not set(groups[train]) & set(groups[valid])
    assert abs(len(valid) / len(labels) - 0.2) < 0.02
    for c in np.unique(labels):
        share = (labels[valid] == c).sum() / (labels == c).sum()
        if (labels == c).sum() >= 50:
            assert abs(share - 0.2) < 0.05, (c, share)


def test_kfold_folds_are_balanced_disjoint_and_reproducible():
    labels, groups = _data(seed=3)
    folds = stratified_group_kfold(labels, groups, 5, seed=7)
    assert folds.shape == labels.shape and set(folds) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.05 * len(labels)
    per_class = np.array(
        [np.bincount(folds[labels == c], minlength=5) for c in range(6)]
    )
    assert (
        per_class.max(1) - per_class.min(1) <= np.maximum(4, 0.1 * per_class.sum(1))
    ).all()
    np.testing.assert_array_equal(
        folds, stratified_group_kfold(labels, groups, 5, seed=7)
    )
    assert not np.array_equal(folds, stratified_group_kfold(labels, groups, 5, seed=8))


def test_no_groups_means_one_sample_per_group_and_bad_args():
    labels = np.arange(100) % 4
    train, valid = group_split(labels, None, 0.25, seed=0)
    assert 24 <= len(valid) <= 28  # 6 or 7 of each class of 25
    assert set(np.bincount(labels[valid])) <= {6, 7}
    with pytest.raises(ValueError, match="valid_fraction"):
        group_split(labels, None, 1.0, seed=0)
    with pytest.raises(ValueError, match="groups has 3 entries"):
        stratified_group_kfold(labels, ["a", "b", "c"], 3, seed=0)


def test_matches_sklearn_quality():
    """As balanced as sklearn's StratifiedGroupKFold (a test-only dependency)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = _data(seed=5)
    ours = stratified_group_kfold(labels, groups, 4, seed=0)
    theirs = np.zeros_like(ours)
    sgkf = StratifiedGroupKFold(4, shuffle=True, random_state=0)
    for k, (_, idx) in enumerate(sgkf.split(labels, labels, groups)):
        theirs[idx] = k

    def spread(folds):
        table = np.array(
            [np.bincount(folds[labels == c], minlength=4) for c in range(6)]
        )
        return (table / table.sum(1, keepdims=True)).std(1).mean()

    assert spread(ours) <= spread(theirs) * 1.25
