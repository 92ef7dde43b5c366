"""Evaluation on any number of replicas and workers: padded full batches whose blank
rows weigh 0, the same batch count on every worker, and a hold-out that says what
fraction it used. Real digit records (4 train shards of about 61 records)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from shopee_tpu.data.read.files import HoldoutWarning, holdout_files
from shopee_tpu.data.read.pipeline import (
    count_records,
    eval_batches,
    list_files,
    load_dataset,
    read_ids_labels,
)


def _collect(ds):
    xs, ys, ws = [], [], []
    for x, y, w in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        ws.append(w)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), len(xs)


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_padded_validation_counts_each_record_once_on_every_worker(
    digits_records, workers
):
    files = list_files(digits_records["train"])  # 4 shards: by file, then by record
    n = count_records(files)
    truth = read_ids_labels(files)
    batch = 8
    batches = eval_batches(files, batch, workers)
    labels = []
    for w in range(workers):
        ds = load_dataset(
            files,
            image_size=32,
            batch_size=batch,
            training=False,
            labels=True,
            pad=True,
            num_workers=workers,
            worker_index=w,
        )
        # Static batch shapes: a TPU (or 8-way DataParallel) splits every batch.
        assert ds.element_spec[0].shape.as_list() == [batch, 32, 32, 3]
        assert int(ds.cardinality()) == batches
        x, y, weight, seen = _collect(ds)
        assert seen == batches  # every worker steps the same number of times
        real = weight > 0
        assert set(np.unique(weight)) <= {0.0, 1.0}
        blanks = np.flatnonzero(~real)
        if blanks.size:  # blank rows only after the last record
            assert not real[blanks[0] :].any() and len(blanks) < batch * batches
        assert (x[~real] == 0).all() and (y[~real] == 0).all()
        labels.extend(y[real].argmax(1).tolist())
    assert len(labels) == n
    assert sorted(labels) == sorted(truth["label"].tolist())


def test_padded_ids_and_unknown_counts(digits_records, tmp_path):
    test = digits_records["test"]
    ids = read_ids_labels(test)["id"].tolist()
    ds = load_dataset(test, image_size=32, batch_size=16, training=False, pad=True)
    got, weights = [], []
    for _, i, w in ds.as_numpy_iterator():
        got.extend(v.decode() for v in i)
        weights.extend(w.tolist())
    assert len(got) == 16 * -(-len(ids) // 16)
    assert [i for i, w in zip(got, weights) if w] == ids
    assert all(i == "" for i, w in zip(got, weights) if not w)

    # Records without a manifest or a count in their names: one worker still pads
    # by itself (inside tf.data); several workers need the counts and say so.
    bare = tmp_path / "bare"
    bare.mkdir()
    originals = list_files(digits_records["train"])[:2]
    for k, f in enumerate(originals):
        shutil.copy(f, bare / f"part{'ab'[k]}.tfrec")
    n = count_records(originals)
    ds = load_dataset(
        bare,
        image_size=32,
        batch_size=8,
        training=False,
        labels=True,
        num_classes=10,
        pad=True,
    )
    _, _, weight, seen = _collect(ds)
    assert weight.sum() == n and seen == -(-n // 8)
    with pytest.raises(ValueError, match="record counts"):
        load_dataset(
            bare,
            image_size=32,
            batch_size=8,
            training=False,
            labels=True,
            num_classes=10,
            pad=True,
            num_workers=2,
            worker_index=0,
        )


def test_holdout_says_what_fraction_it_used_and_suggests_shards(digits_records):
    files = list_files(digits_records["train"])
    n = count_records(files)
    with pytest.warns(HoldoutWarning) as caught:
        train, valid = holdout_files(files, 0.1, seed=0)
    message = str(caught[0].message)
    share = count_records(valid) / n
    assert len(valid) == 1 and sorted(train + valid) == files
    assert f"{share:.1%}" in message and "1 of 4 shards" in message
    assert "--shards 10" in message and "data.valid" in message
    # Within half a shard's share of what was asked: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", HoldoutWarning)
        train, valid = holdout_files(files, 0.3, seed=0)
        assert len(valid) == 1
        train, valid = holdout_files(files, 0.5, seed=0)
        assert len(valid) == 2
