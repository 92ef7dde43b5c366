"""The record writer: format, sources, skipped images, manifest and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import photo_crops, run_python
from PIL import Image

from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.tfrecord import crc32c, encode_example, read_records
from shopee_tpu.data.write.records import write_records, write_records_from_csv


def _jpeg(side=40, seed=0, size=None) -> bytes:
    """A real photo crop as JPEG bytes, ``side`` rows by ``size`` (or ``side``) columns."""
    arr = photo_crops(1, max(side, size or side), seed=seed)[0]
    img = Image.fromarray(arr).resize((size or side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _parse(record: bytes) -> dict:
    import tensorflow as tf

    ex = tf.train.Example.FromString(record)
    out = {}
    for name, f in ex.features.feature.items():
        kind = f.WhichOneof("kind")
        out[name] = list(getattr(f, kind).value)
    return out


def _all_records(out_dir) -> list[dict]:
    m = read_manifest(out_dir)
    recs = []
    for name in sorted(m["shards"]):
        recs.extend(_parse(r) for r in read_records(os.path.join(out_dir, name)))
    return recs


def test_crc32c_and_example_encoding_match_tensorflow(tmp_path):
    import tensorflow as tf

    assert crc32c(b"123456789") == 0xE3069283
    data = _jpeg(60)
    record = encode_example(
        {"image": data, "label": -1, "id": "x.jpg", "f": [0.5, 2.0], "n": [3, 4]}
    )
    parsed = _parse(record)
    assert parsed == {
        "image": [data],
        "label": [-1],
        "id": [b"x.jpg"],
        "f": [0.5, 2.0],
        "n": [3, 4],
    }
    from shopee_tpu.data.tfrecord import RecordWriter

    with RecordWriter(str(tmp_path / "ours.tfrec")) as w:
        w.write(record)
        w.write(b"")
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrec")) as w:
        w.write(record)
        w.write(b"")
    ours = (tmp_path / "ours.tfrec").read_bytes()
    assert ours == (tmp_path / "tf.tfrec").read_bytes()


def test_shopee_layout_round_trip_keeps_bytes_md5_and_labels(digits_dir, tmp_path):
    out = tmp_path / "rec"
    m = write_records_from_csv(
        digits_dir["train_csv"], digits_dir["root"], out, shards=4, workers=2, seed=1
    )
    csv = pd.read_csv(digits_dir["train_csv"], dtype=str)
    assert m["total"] == len(csv) and m["skipped"] == [] and m["complete"]
    assert sum(m["shards"].values()) == m["total"]
    for name, count in m["shards"].items():
        assert name.endswith(f"-{count}.tfrec") and (out / name).exists()
    assert m["label_map"] == {f"{i:02d}": i for i in range(10)}
    assert m["class_counts"] == csv["category"].value_counts().to_dict()
    recs = _all_records(out)
    by_id = {r["id"][0].decode(): r for r in recs}
    assert len(by_id) == len(csv)
    for row in csv.itertuples():
        r = by_id[row.filename]
        path = os.path.join(digits_dir["train_images"], row.category, row.filename)
        original = open(path, "rb").read()
        # image_size=None keeps the original file byte for byte.
        assert r["image"][0] == original
        assert r["md5"][0].decode() == hashlib.md5(original).hexdigest()
        assert r["label"][0] == int(row.category)
        assert r["group"][0].decode() == row.group
    # Each product sits in exactly one shard.
    shard_of = {}
    for name in m["shards"]:
        for rec in read_records(str(out / name)):
            shard_of.setdefault(_parse(rec)["group"][0], set()).add(name)
    assert all(len(s) == 1 for s in shard_of.values())


def test_test_csv_ignores_placeholder_and_keeps_ids(digits_dir, tmp_path):
    m = write_records_from_csv(
        digits_dir["test_csv"], digits_dir["root"], tmp_path / "t", test=True, shards=2
    )
    recs = _all_records(tmp_path / "t")
    names = set(pd.read_csv(digits_dir["test_csv"])["filename"])
    assert {r["id"][0].decode() for r in recs} == names
    assert {r["label"][0] for r in recs} == {-1}
    assert (
        m["label_map"] == {}
        and m["test"]
        and m["class_counts"] == {"unlabeled": len(names)}
    )


def test_resize_square_and_longest(tmp_path):
    rows = []
    for i, (h, w) in enumerate([(60, 90), (30, 20), (64, 64)]):
        p = tmp_path / f"im{i}.jpg"
        p.write_bytes(_jpeg(h, seed=i, size=w))
        rows.append((str(p), "a" if i % 2 else "b"))
    df = pd.DataFrame(rows, columns=["path", "label"])
    for mode, expect in [
        ("square", [(32, 32)] * 3),
        ("longest", [(32, 21), (20, 30), (32, 32)]),
    ]:
        out = tmp_path / mode
        write_records(
            df, out, shards=1, image_size=32, resize=mode, quality=80, workers=1
        )
        sizes = {
            r["id"][0].decode(): Image.open(io.BytesIO(r["image"][0])).size
            for r in _all_records(out)
        }
        assert [sizes[f"im{i}.jpg"] for i in range(3)] == expect


def test_bad_images_are_skipped_counted_and_listed(tmp_path):
    good = [tmp_path / f"g{i}.jpg" for i in range(4)]
    for i, p in enumerate(good):
        p.write_bytes(_jpeg(48, seed=i))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "cut.jpg").write_bytes(_jpeg(64, seed=9)[:700])
    paths = [
        *map(str, good),
        *(str(tmp_path / n) for n in ("empty.jpg", "junk.jpg", "cut.jpg")),
    ]
    paths.append(str(tmp_path / "missing.jpg"))
    df = pd.DataFrame({"path": paths, "label": ["x", "y"] * 4})
    m = write_records(df, tmp_path / "out", shards=2, workers=2, image_size=32)
    assert m["total"] == 4 and m["num_skipped"] == 4
    reasons = {os.path.basename(s["path"]): s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"empty.jpg", "junk.jpg", "cut.jpg", "missing.jpg"}
    assert reasons["missing.jpg"] == "missing file"
    assert "0 bytes" in reasons["empty.jpg"]
    assert "not an image" in reasons["junk.jpg"]
    assert "truncated" in reasons["cut.jpg"]
    assert read_manifest(tmp_path / "out")["skipped"] == m["skipped"]


def test_iterable_source_streams_into_balanced_shards(tmp_path):
    # 15 products of 2 images each (same class), arriving interleaved.
    items = [(_jpeg(24, seed=i), i % 3, f"id{i}", f"g{i % 15}") for i in range(30)]
    items.append((b"", 0, "bad", "g99"))
    m = write_records(iter(items), tmp_path / "s", shards=3, workers=2, seed=0)
    assert m["total"] == 30 and [s["path"] for s in m["skipped"]] == ["bad"]
    assert m["label_map"] == {"0": 0, "1": 1, "2": 2}
    assert all(8 <= n <= 12 for n in m["shards"].values())
    for counts in m["shard_class_counts"].values():
        assert all(2 <= n <= 4 for n in counts.values())
    recs = _all_records(tmp_path / "s")
    assert sorted(r["id"][0].decode() for r in recs) == sorted(
        f"id{i}" for i in range(30)
    )
    shards_of_group = {}
    for name in m["shards"]:
        for rec in read_records(str(tmp_path / "s" / name)):
            shards_of_group.setdefault(_parse(rec)["group"][0], set()).add(name)
    assert len(shards_of_group) == 15
    assert all(len(v) == 1 for v in shards_of_group.values())
    m1 = write_records(iter(items), tmp_path / "s1", shards=3, workers=1, seed=0)
    assert (
        m1["shards"] == m["shards"]
        and m1["shard_class_counts"] == m["shard_class_counts"]
    )


def test_crc32c_equals_the_bytewise_definition_at_every_length():
    # The fast path pads short blocks at the front and folds the initial register
    # into the first bytes: check it byte for byte, across block boundaries.
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)

    def reference(data: bytes) -> int:
        crc = 0xFFFFFFFF
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

    rng = np.random.default_rng(0)
    lengths = [*range(0, 1100, 7), 511, 512, 513, 767, 768, 769, 30001, 65536]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == reference(data), n


def test_progress_counts_every_image_across_worker_processes(tmp_path, capsys):
    from shopee_tpu.data.write.shard_writer import ShardParams
    from shopee_tpu.data.write.writer_pool import WorkerPool

    paths = []
    for i in range(24):
        paths.append(tmp_path / f"im{i}.jpg")
        paths[-1].write_bytes(_jpeg(40, seed=i))
    df = pd.DataFrame({"path": list(map(str, paths)), "label": ["a", "b"] * 12})
    # The pool reports rows done by each process as it goes, before the results.
    params = ShardParams(str(tmp_path / "pool"), "train", 2, 32, "square", 90)
    os.makedirs(params.out_dir)
    tasks = [
        (params, s, [(str(p), 0, p.name, "") for p in paths[s::4]]) for s in range(4)
    ]
    events = []
    with WorkerPool(2, params) as pool:
        for result in pool.map_unordered(tasks, progress=lambda n: events.append(n)):
            events.append(result)
    counts = [e for e in events if isinstance(e, int)]
    assert sum(counts) == 24 and isinstance(events[0], int)
    # The API and the CLI show it as one bar: images, images/s and the time left.
    m = write_records(df, tmp_path / "out", shards=4, workers=2, image_size=32)
    err = capsys.readouterr().err
    assert m["total"] == 24
    assert "records train" in err and "24/24" in err and "img/s" in err
    write_records(df, tmp_path / "quiet", shards=4, workers=2, verbose=False)
    assert capsys.readouterr().err == ""


def test_bad_input_errors_name_the_problem(digits_dir, tmp_path):
    csv = tmp_path / "no_category.csv"
    pd.read_csv(digits_dir["train_csv"])[["filename"]].to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"no_category\.csv.*missing column 'label'"):
        write_records_from_csv(csv, digits_dir["root"], tmp_path / "a")

    lm = {"00": 0, "01": 1}
    with pytest.raises(ValueError, match=r"not in the label map.*'02'"):
        write_records_from_csv(
            digits_dir["train_csv"], digits_dir["root"], tmp_path / "b", label_map=lm
        )

    (tmp_path / "bad.jpg").write_bytes(b"")
    df = pd.DataFrame(
        {"path": [str(tmp_path / "bad.jpg"), "nowhere.jpg"], "label": [1, 2]}
    )
    with pytest.raises(ValueError, match="no usable images"):
        write_records(df, tmp_path / "c", workers=1)

    out = tmp_path / "d"
    write_records_from_csv(digits_dir["train_csv"], digits_dir["root"], out, shards=2)
    with pytest.raises(ValueError, match=r"other settings \(image_size: None -> 16"):
        write_records_from_csv(
            digits_dir["train_csv"], digits_dir["root"], out, shards=2, image_size=16
        )
    with pytest.raises(ValueError, match="different dataset"):
        write_records_from_csv(
            digits_dir["train_csv"],
            digits_dir["root"],
            out,
            shards=2,
            label_map={f"{i:02d}": i for i in range(11)},
        )
    m = write_records_from_csv(
        digits_dir["train_csv"],
        digits_dir["root"],
        out,
        shards=2,
        image_size=16,
        overwrite=True,
    )
    assert m["image_size"] == 16
    assert sorted(os.listdir(out)) == sorted([*m["shards"], "manifest.json"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "00-224x224-5.tfrec").write_bytes(b"")
    with pytest.raises(ValueError, match="without a manifest.json"):
        write_records(df, tmp_path / "foreign")


def test_writer_needs_no_tensorflow(digits_dir, tmp_path):
    out = tmp_path / "rec"
    code = f"""
import sys
sys.modules["tensorflow"] = None  # any import of TF now fails
import shopee_tpu.data as data
m = data.write_records_from_csv({digits_dir["train_csv"]!r}, {digits_dir["root"]!r},
                                {str(out)!r}, shards=3, image_size=24, workers=2)
print(m["total"])
"""
    total = int(run_python(code).strip().splitlines()[-1])
    m = json.loads((out / "manifest.json").read_text())
    assert total == m["total"] == sum(m["shards"].values()) > 0


def test_csv_label_falls_back_to_folder_and_product_id_column(digits_dir, tmp_path):
    csv = pd.read_csv(digits_dir["train_csv"], dtype=str).head(40)
    csv = csv.rename(columns={"group": "product_id"})
    csv.loc[::3, "category"] = ""  # folder NN/ gives the category
    path = tmp_path / "partial.csv"
    csv.to_csv(path, index=False)
    m = write_records_from_csv(path, digits_dir["root"], tmp_path / "o", shards=2)
    truth = pd.read_csv(digits_dir["train_csv"], dtype=str).head(40)
    recs = {r["id"][0].decode(): r for r in _all_records(tmp_path / "o")}
    assert m["total"] == 40
    for row in truth.itertuples():
        assert recs[row.filename]["label"][0] == m["label_map"][row.category]
        assert recs[row.filename]["group"][0].decode() == row.group
