"""The reader: round trip, eval exactly-once, training batches, schemas, sharding."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from conftest import photo_crops
from PIL import Image

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.decode import DCT_METHOD
from shopee_tpu.data.read.pipeline import (
    count_records,
    holdout_files,
    list_files,
    load_dataset,
    read_ids_labels,
)
from shopee_tpu.data.schemas import Schema
from shopee_tpu.data.write.records import write_records_from_csv


@pytest.fixture(scope="module")
def records(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    manifest = write_records_from_csv(
        digits_dir["train_csv"], digits_dir["root"], out, shards=5, workers=1, seed=0
    )
    return str(out), manifest


def _original(digits_dir, name, category):
    import tensorflow as tf

    path = os.path.join(digits_dir["train_images"], category, name)
    return tf.io.decode_jpeg(
        tf.io.read_file(path), channels=3, dct_method=DCT_METHOD
    ).numpy()


def test_eval_round_trip_every_record_once_ids_aligned(digits_dir, records):
    out, manifest = records
    csv = pd.read_csv(digits_dir["train_csv"], dtype=str).set_index("filename")
    ds = load_dataset(out, image_size=32, batch_size=64, training=False)
    sizes, ids, images = [], [], []
    for x, i in ds:
        assert x.dtype.name == "uint8" and x.shape[1:] == (32, 32, 3)  # 0..255
        sizes.append(int(x.shape[0]))
        ids.extend(v.decode() for v in i.numpy())
        images.append(x.numpy())
    n = manifest["total"]
    assert sizes == [64] * (n // 64) + [n % 64]  # last partial batch kept
    assert sorted(ids) == sorted(csv.index) and len(ids) == n
    table = read_ids_labels(out)
    assert table["id"].tolist() == ids  # same order as the eval dataset
    images = np.concatenate(images)
    for k in range(0, n, 37):
        row = csv.loc[ids[k]]
        assert table["label"][k] == int(row["category"])
        assert table["group"][k] == row["group"]
        # Stored bytes are the originals: the same decoder gives the same pixels.
        original = _original(digits_dir, ids[k], row["category"])
        np.testing.assert_array_equal(images[k], original)
    # Labels mode: one-hot labels in the same order.
    ys = np.concatenate(
        [
            y.numpy()
            for _, y in load_dataset(
                out, image_size=32, batch_size=50, training=False, labels=True
            )
        ]
    )
    assert ys.shape == (n, 10) and ys.argmax(1).tolist() == table["label"].tolist()


def test_training_batches_static_shapes_and_value_range(records):
    out, _ = records
    ds = load_dataset(
        out,
        image_size=40,
        batch_size=16,
        training=True,
        seed=3,
        augment=AugmentConfig(flip_lr=True, rotate=10, mixup=0.4),
        value_range=(-1, 1),
    )
    assert ds.element_spec[0].shape.as_list() == [16, 40, 40, 3]
    assert ds.element_spec[1].shape.as_list() == [16, 10]
    for x, y in ds.take(3):
        x, y = x.numpy(), y.numpy()
        assert -1 <= x.min() < 0 < x.max() <= 1
        np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)


def test_deterministic_training_batches_repeat_for_a_seed(records):
    out, _ = records
    cfg = AugmentConfig(flip_lr=True, zoom=0.1)

    def batches(seed):
        ds = load_dataset(
            out,
            image_size=32,
            batch_size=16,
            training=True,
            seed=seed,
            augment=cfg,
            deterministic=True,
        )
        return [(x.numpy(), y.numpy()) for x, y in ds.take(4)]

    first, again, other = batches(5), batches(5), batches(6)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])


def test_count_list_holdout(records):
    out, manifest = records
    files = list_files(out)
    assert [os.path.basename(f) for f in files] == sorted(manifest["shards"])
    assert count_records(out) == count_records(files) == manifest["total"]
    assert list_files(os.path.join(out, "train-0[01]-*.tfrec")) == files[:2]
    train, valid = holdout_files(out, 0.2, seed=1)
    assert len(valid) == 1 and sorted(train + valid) == files
    assert holdout_files(out, 0.2, seed=1) == (train, valid)
    with pytest.raises(FileNotFoundError, match="no TFRecord files"):
        list_files(os.path.join(out, "nothing-*.tfrec"))


def test_workers_share_the_records_exactly_once(records):
    out, manifest = records
    for n_workers in (2, 7):  # 5 files: by file, then by record
        ids = []
        for w in range(n_workers):
            ds = load_dataset(
                out,
                image_size=32,
                batch_size=32,
                training=False,
                num_workers=n_workers,
                worker_index=w,
            )
            ids.extend(v.decode() for _, i in ds for v in i.numpy())
        assert len(ids) == len(set(ids)) == manifest["total"]


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tf(path, examples):
    import tensorflow as tf

    def feature(v):
        if isinstance(v, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        if isinstance(v, list):
            return tf.train.Feature(float_list=tf.train.FloatList(value=v))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    with tf.io.TFRecordWriter(str(path)) as w:
        for ex in examples:
            feats = tf.train.Features(feature={k: feature(v) for k, v in ex.items()})
            w.write(tf.train.Example(features=feats).SerializeToString())


LAYOUTS = {
    # name: (labeled record, unlabeled record) builders from (jpeg, label, id)
    "flowers": (
        lambda j, y, i: {"image": j, "class": y, "id": i},
        lambda j, y, i: {"image": j, "id": i},
    ),
    "melanoma": (
        lambda j, y, i: {
            "image": j,
            "image_name": i,
            "target": y % 2,
            "patient_id": 7,
            "sex": 1,
            "age_approx": 40,
            "anatom_site_general_challenge": 2,
            "diagnosis": 3,
        },
        lambda j, y, i: {"image": j, "image_name": i},
    ),
    "shopee-community": (
        lambda j, y, i: {"image": j, "label": y, "one_hot_label": list(np.eye(4)[y])},
        lambda j, y, i: {"image": j, "filename": i},
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_named_schemas_read_kaggle_layouts(name, tmp_path):
    labeled, unlabeled = LAYOUTS[name]
    # Kaggle datasets store larger squares (e.g. 512 for 224 models): 72 -> 32
    # decodes at 1/2 scale, then resizes.
    arrays = list(photo_crops(10, 72, seed=0))
    labels = [k % 4 for k in range(10)]
    ids = [f"img{k}".encode() for k in range(10)]
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    _write_tf(
        tmp_path / "train" / "x00-6.tfrec",
        [labeled(_jpeg(a), y, i) for a, y, i in list(zip(arrays, labels, ids))[:6]],
    )
    _write_tf(
        tmp_path / "train" / "x01-4.tfrec",
        [labeled(_jpeg(a), y, i) for a, y, i in list(zip(arrays, labels, ids))[6:]],
    )
    _write_tf(
        tmp_path / "test" / "t00-10.tfrec",
        [unlabeled(_jpeg(a), y, i) for a, y, i in zip(arrays, labels, ids)],
    )
    classes = 2 if name == "melanoma" else 4
    want = [y % 2 if name == "melanoma" else y for y in labels]
    ds = load_dataset(
        tmp_path / "train",
        schema=name,
        image_size=32,
        batch_size=4,
        training=False,
        labels=True,
        num_classes=classes,
    )
    got = np.concatenate([y.numpy() for _, y in ds]).argmax(1).tolist()
    assert got == want
    x, y = next(
        iter(
            load_dataset(
                tmp_path / "train",
                schema=name,
                image_size=32,
                batch_size=4,
                training=True,
                num_classes=classes,
            )
        )
    )
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, classes)
    ds = load_dataset(
        tmp_path / "test", schema=name, image_size=32, batch_size=4, training=False
    )
    test_ids = [v for _, i in ds for v in i.numpy()]
    first = next(iter(ds))[0].numpy()[0].astype(np.float32)  # uint8 pixels
    expected = np.asarray(Image.fromarray(arrays[0]).resize((32, 32), Image.BILINEAR))
    assert np.abs(first - expected).mean() < 12  # same picture, smaller
    assert test_ids == ids
    assert count_records(tmp_path / "test") == 10


def test_wrong_schema_and_custom_names(records, tmp_path):
    out, _ = records
    with pytest.raises(ValueError, match=r"no feature 'target'.*schema 'melanoma'"):
        load_dataset(out, schema="melanoma", image_size=32, batch_size=8, training=True)
    with pytest.raises(ValueError, match=r"no feature 'pixels'.*schema 'mine'"):
        load_dataset(
            out,
            schema=Schema("mine", image="pixels"),
            image_size=32,
            batch_size=8,
            training=False,
        )
    # Our records read through a custom schema that uses 'md5' as the id.
    ds = load_dataset(
        out,
        schema=Schema("by-md5", id="md5"),
        image_size=32,
        batch_size=300,
        training=False,
    )
    ids = [v.decode() for v in next(iter(ds))[1].numpy()]
    assert ids == read_ids_labels(out)["md5"].tolist()
    with pytest.raises(ValueError, match="num_classes"):
        _write_tf(tmp_path / "f-1.tfrec", [{"image": b"x", "class": 1}])
        load_dataset(
            tmp_path / "f-1.tfrec",
            schema="flowers",
            image_size=8,
            batch_size=1,
            training=True,
        )


def test_show_batch_titles_with_category_names_and_ids(records, tmp_path):
    from shopee_tpu.plots import show_batch

    out, manifest = records
    ds = load_dataset(out, image_size=32, batch_size=12, training=False, labels=True)
    fig = show_batch(ds, manifest["label_map"], n=9, path=tmp_path / "batch.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    first = next(iter(ds))[1].numpy().argmax(1)[:9]
    names = {v: k for k, v in manifest["label_map"].items()}
    assert titles == [names[int(c)] for c in first]
    assert (tmp_path / "batch.png").stat().st_size > 1000
    ds = load_dataset(out, image_size=32, batch_size=4, training=False)
    titles = [ax.get_title() for ax in show_batch(ds).axes if ax.get_title()]
    assert len(titles) == 4 and all(t.endswith("...") for t in titles)


def test_cache_options_keep_results(records):
    out, manifest = records
    ds = load_dataset(out, image_size=32, batch_size=100, training=False, cache=True)
    first = [(x.numpy(), i.numpy()) for x, i in ds]
    second = [(x.numpy(), i.numpy()) for x, i in ds]
    assert sum(len(i) for _, i in first) == manifest["total"]
    for (x1, i1), (x2, i2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(i1, i2)
    ds = load_dataset(out, image_size=32, batch_size=64, training=True, cache=True)
    for x, y in ds.take(6):  # more than one pass over the 245 records
        assert x.shape == (64, 32, 32, 3) and y.shape == (64, 10)
