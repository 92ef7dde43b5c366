"""The Cdiscount pipeline: BSON reading, the seeded product split, the class map,
dedup counts, bad input, resume, and train.bson -> submission through the CLI.

BSON files are made in the real format with pymongo's ``bson.encode`` and real JPEG
bytes (scikit-learn's digit scans, ``make_cdiscount_sample``)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

import bson  # pymongo's, a test extra
import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from shopee_tpu.cdiscount.bson_reader import (
    BsonFormatError,
    iter_products,
    read_product,
)
from shopee_tpu.cdiscount.plan import split_products
from shopee_tpu.cdiscount.prepare import (
    prepare_cdiscount,
    prepare_cdiscount_test,
    read_categories,
)
from shopee_tpu.cdiscount.sample import (
    SAMPLE_CATEGORY_IDS,
    make_cdiscount_sample,
)

SIZE = 32


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdiscount")
    return make_cdiscount_sample(
        root / "data",
        products=160,
        test_products=40,
        image_size=SIZE,
        duplicate_fraction=0.15,
        conflict_fraction=0.03,
        seed=0,
    )


@pytest.fixture(scope="module")
def prepared(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("cdiscount_rec") / "rec"
    manifest = prepare_cdiscount(
        sample["train"], out, category_names=sample["category_names"], shards=4,
        workers=2, verbose=False,
    )  # fmt: skip
    return out, manifest


def _docs(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(bson.decode_file_iter(f))


def _records(folder):
    from shopee_tpu.data.read.pipeline import read_ids_labels

    return read_ids_labels(folder)


def test_reader_streams_products_with_offsets_for_random_access(sample):
    docs = _docs(sample["train"])
    products = list(iter_products(sample["train"]))
    assert [p.id for p in products] == [d["_id"] for d in docs]
    assert [p.category_id for p in products] == [d["category_id"] for d in docs]
    assert products[0].offset == 0
    for a, b in zip(products, products[1:]):
        assert b.offset == a.offset + a.length
    assert products[-1].offset + products[-1].length == os.path.getsize(sample["train"])
    with open(sample["train"], "rb") as f:
        p = products[len(products) // 2]
        again = read_product(f, p.offset, p.length)
    assert again == p
    assert all(pic[:2] == b"\xff\xd8" for p in products for pic in p.pictures)


def test_saved_index_gives_random_access_and_goes_stale_with_the_file(
    sample, prepared, tmp_path
):
    from shopee_tpu.cdiscount.plan import BsonIndex

    out, _ = prepared
    index = BsonIndex.load_for(out / "index.npz", sample["train"])
    docs = _docs(sample["train"])
    want = docs[77]
    got = index.read(want["_id"])
    assert got.category_id == want["category_id"]
    assert list(got.pictures) == [i["picture"] for i in want["imgs"]]
    assert (
        index.n_images.sum() == len(index.digests) == sum(len(d["imgs"]) for d in docs)
    )
    copy = tmp_path / "train.bson"
    copy.write_bytes(open(sample["train"], "rb").read()[:-1])
    assert BsonIndex.load_for(out / "index.npz", copy) is None  # other size


def test_split_is_disjoint_reproducible_and_order_free(sample, prepared):
    ids = np.array([d["_id"] for d in _docs(sample["train"])])
    a = split_products(ids, 0.05, 12648430)
    assert a.sum() == round(0.05 * len(ids))
    assert np.array_equal(a, split_products(ids, 0.05, 12648430))
    order = np.random.default_rng(3).permutation(len(ids))
    shuffled = split_products(ids[order], 0.05, 12648430)
    assert set(ids[order][shuffled]) == set(ids[a])  # the file order does not matter
    b = split_products(ids, 0.05, 1)  # DATASET_B
    assert set(ids[a]) != set(ids[b])

    out, manifest = prepared
    train, valid = _records(out), _records(out / "valid")
    assert set(train["group"]).isdisjoint(valid["group"])
    assert set(valid["group"]) == {str(i) for i in ids[a]}
    # Every image of a product is on its product's side, under the product's class.
    label_map = manifest["label_map"]
    category = {str(d["_id"]): d["category_id"] for d in _docs(sample["train"])}
    for frame in (train, valid):
        want = [label_map[str(category[g])] for g in frame["group"]]
        assert frame["label"].tolist() == want
        assert all(i.startswith(f"{g}-") for i, g in zip(frame["id"], frame["group"]))
    n_images = sum(len(d["imgs"]) for d in _docs(sample["train"]))
    assert len(train) + len(valid) == n_images
    assert manifest["valid"] == "valid" and manifest["complete"]


def test_class_map_follows_category_names_and_joins_names(sample, prepared):
    out, manifest = prepared
    names = pd.read_csv(sample["category_names"], dtype=str)
    want = {c: i for i, c in enumerate(names["category_id"])}
    assert manifest["label_map"] == want  # file order, unused categories included
    table = read_categories(out)
    assert table["category_id"].tolist() == names["category_id"].tolist()
    assert table["category_level3"].tolist() == names["category_level3"].tolist()
    assert table["train_images"].sum() == manifest["total"]


def test_missing_category_names_warn_with_count(sample, tmp_path):
    names = pd.read_csv(sample["category_names"], dtype=str)
    short = names[~names["category_id"].isin(["1000010653", "1000004079"])]
    short.to_csv(tmp_path / "names.csv", index=False)
    with pytest.warns(UserWarning, match="2 categories seen in training are missing"):
        manifest = prepare_cdiscount(
            sample["train"], tmp_path / "rec", category_names=tmp_path / "names.csv",
            workers=1, verbose=False,
        )  # fmt: skip
    lm = manifest["label_map"]
    assert lm["1000004079"] == len(short) and lm["1000010653"] == len(short) + 1
    assert manifest["cdiscount"]["categories"]["missing_from_category_names"] == 2


def test_dedup_counts_match_an_independent_count(sample, prepared, tmp_path):
    out, plain = prepared
    valid_groups = set(_records(out / "valid")["group"])
    side = [  # (md5, category) of every training-side image, in file order
        (hashlib.md5(img["picture"]).hexdigest(), d["category_id"])
        for d in _docs(sample["train"])
        if str(d["_id"]) not in valid_groups
        for img in d["imgs"]
    ]
    labels: dict[str, set] = {}
    for d in _docs(sample["train"]):
        for img in d["imgs"]:
            labels.setdefault(hashlib.md5(img["picture"]).hexdigest(), set()).add(
                d["category_id"]
            )
    conflicting = [m for m, _ in side if len(labels[m]) > 1]
    assert plain["total"] == len(side) and len(conflicting) > 0

    dd = prepare_cdiscount(
        sample["train"], tmp_path / "dedup", category_names=sample["category_names"],
        dedup=True, workers=1, verbose=False,
    )  # fmt: skip
    counts = dd["cdiscount"]["dedup"]
    distinct = len({m for m, _ in side})
    assert counts["duplicates_dropped"] == len(side) - distinct > 0
    assert dd["total"] == distinct
    assert _records(tmp_path / "dedup")["md5"].is_unique

    both = prepare_cdiscount(
        sample["train"], tmp_path / "both", category_names=sample["category_names"],
        dedup=True, drop_conflicts=True, workers=1, verbose=False,
    )  # fmt: skip
    counts = both["cdiscount"]["dedup"]
    assert counts["conflicts_dropped"] == len(conflicting)
    kept = {m for m, _ in side if len(labels[m]) == 1}
    assert both["total"] == len(kept) == counts["kept"]
    assert counts["duplicates_dropped"] == len(side) - len(conflicting) - len(kept)
    # The MD5 dictionary covers every training image, both sides of the split.
    assert dd["cdiscount"]["md5"]["images"] == sum(
        len(d["imgs"]) for d in _docs(sample["train"])
    )


def test_truncated_file_names_offset_and_products_then_recovers(sample, tmp_path):
    products = list(iter_products(sample["train"]))
    cut = products[50]
    data = open(sample["train"], "rb").read()
    bad = tmp_path / "train.bson"
    bad.write_bytes(data[: cut.offset + cut.length // 2])
    out = tmp_path / "rec"
    with pytest.raises(BsonFormatError) as e:
        prepare_cdiscount(bad, out, workers=1, verbose=False)
    msg = str(e.value)
    assert f"truncated at byte {cut.offset}" in msg
    assert "after 50 complete products" in msg and str(bad) in msg
    assert not glob.glob(str(out / "*.tfrec"))  # nothing that looks finished

    bad.write_bytes(data)  # the download completed: the same command now works
    manifest = prepare_cdiscount(bad, out, workers=1, verbose=False)
    assert manifest["complete"]
    assert manifest["total"] + manifest["cdiscount"]["split"]["valid_images"] == sum(
        len(p.pictures) for p in products
    )


def test_corrupt_document_names_its_offset(sample, tmp_path):
    products = list(iter_products(sample["train"]))
    data = bytearray(open(sample["train"], "rb").read())
    data[products[7].offset + 4] = 0x7F  # not a BSON type code
    (tmp_path / "train.bson").write_bytes(bytes(data))
    with pytest.raises(BsonFormatError, match=f"corrupt document at byte "
                       f"{products[7].offset} after 7 complete products"):  # fmt: skip
        list(iter_products(tmp_path / "train.bson"))


def test_cli_reports_truncation_as_an_error(sample, tmp_path, capsys):
    from shopee_tpu.cli import main

    bad = tmp_path / "train.bson"
    bad.write_bytes(open(sample["train"], "rb").read()[:-7])
    code = main(["cdiscount", "prepare", str(bad), "--out", str(tmp_path / "rec")])
    assert code == 1
    err = capsys.readouterr().err
    assert "truncated at byte" in err and "complete products" in err


_KILL = """
import os, signal, sys
import shopee_tpu.cdiscount.prepare as c
import shopee_tpu.cdiscount.shards as shards

class Dies(shards.ShardWriter):
    def add(self, *args):
        if self.index == 2 and self.count == 3:  # mid-way through the third shard
            os.kill(os.getpid(), signal.SIGKILL)
        super().add(*args)

shards.ShardWriter = Dies
c.prepare_cdiscount(sys.argv[1], sys.argv[2], shards=5, workers=1, verbose=False)
"""


def test_killed_conversion_resumes_from_finished_shards(sample, tmp_path):
    out = tmp_path / "rec"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, sample["train"], str(out)], env=env, check=False
    )
    assert proc.returncode == -9
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and sorted(manifest["done"]) == ["0", "1"]
    finished = {n: os.stat(out / n).st_mtime_ns for n in manifest["shards"]}
    assert len(finished) == 2 and glob.glob(str(out / ".train-02.tfrec.tmp-*"))
    # What was written is valid: whole records, counts as named.
    assert len(_records([str(out / n) for n in finished])) == sum(
        manifest["shards"].values()
    )

    resumed = prepare_cdiscount(
        sample["train"], out, shards=5, workers=2, verbose=False
    )
    assert resumed["complete"] and len(resumed["shards"]) == 5
    assert {n: os.stat(out / n).st_mtime_ns for n in finished} == finished
    assert not glob.glob(str(out / ".*.tmp-*"))
    ref = prepare_cdiscount(
        sample["train"], tmp_path / "ref", shards=5, workers=1, verbose=False
    )
    assert resumed["shards"] == ref["shards"]
    got, want = _records(out), _records(tmp_path / "ref")
    assert sorted(got["id"]) == sorted(want["id"])


def _bad_bson(path, docs) -> None:
    with open(path, "wb") as f:
        for d in docs:
            f.write(bson.encode(d))


def test_bad_products_are_skipped_and_counted(sample, tmp_path):
    good = _docs(sample["train"])[:30]
    jpeg = good[0]["imgs"][0]["picture"]
    extra = [
        {"_id": 9001, "category_id": good[0]["category_id"]},  # no imgs
        {"_id": 9002, "category_id": good[0]["category_id"], "imgs": []},
        {
            "_id": 9003,
            "category_id": good[1]["category_id"],
            "imgs": [{"picture": b""}, {"picture": jpeg}],
        },
        {"_id": 9004, "imgs": [{"picture": jpeg}]},  # no category_id
        {
            "_id": 9005,
            "category_id": good[2]["category_id"],
            "imgs": [{"picture": jpeg[: len(jpeg) // 3]}],  # a cut JPEG
        },
    ]
    _bad_bson(tmp_path / "train.bson", good + extra)
    m = prepare_cdiscount(
        tmp_path / "train.bson", tmp_path / "rec", valid_fraction=0, workers=1,
        verbose=False,
    )  # fmt: skip
    stats = m["cdiscount"]["input"]
    assert stats["products_without_imgs"] == 2
    assert stats["empty_pictures"] == 1
    assert stats["products_without_category"] == 1
    assert m["num_skipped"] == 1 and m["skipped"][0]["path"] == "9005-0"
    assert "truncated" in m["skipped"][0]["reason"].lower()
    assert m["total"] == sum(len(d["imgs"]) for d in good) + 1  # 9003's picture


def test_repeated_product_id_is_an_error_naming_it(sample, tmp_path):
    docs = _docs(sample["train"])[:10]
    _bad_bson(tmp_path / "train.bson", docs + [docs[4]])
    with pytest.raises(BsonFormatError, match=f"more than once: {docs[4]['_id']} "):
        prepare_cdiscount(tmp_path / "train.bson", tmp_path / "rec", verbose=False)


def test_test_file_lists_every_product_and_ignores_categories(sample, tmp_path):
    docs = _docs(sample["test"])[:12]
    jpeg = docs[0]["imgs"][0]["picture"]
    docs[3] = {"_id": docs[3]["_id"], "imgs": []}  # nothing to predict from
    docs[4]["category_id"] = 4242424242  # unknown category in test: ignored
    docs[5]["imgs"] = [{"picture": b""}, {"picture": jpeg}]
    _bad_bson(tmp_path / "test.bson", docs)
    m = prepare_cdiscount_test(
        tmp_path / "test.bson", tmp_path / "t", workers=1, verbose=False
    )
    listed = pd.read_csv(tmp_path / "t" / "products.csv")
    assert listed["_id"].tolist() == [d["_id"] for d in docs]
    assert listed.loc[3, "usable_images"] == 0 and listed.loc[5, "usable_images"] == 1
    assert m["cdiscount"]["input"]["empty_pictures"] == 1
    assert m["total"] == sum(len(d["imgs"]) for d in docs) - 1
    assert set(_records(tmp_path / "t")["label"]) == {-1}


@pytest.mark.slow
def test_end_to_end_cli_from_train_bson_to_a_valid_submission(sample, tmp_path):
    from shopee_tpu.cli import main
    from shopee_tpu.inference.submission import validate_cdiscount_submission

    rec, testrec, run = tmp_path / "rec", tmp_path / "testrec", tmp_path / "run"
    names, workers = sample["category_names"], ["--workers", "2"]
    # A test product with no picture still needs its row in the submission.
    test_bson = tmp_path / "test.bson"
    _bad_bson(test_bson, _docs(sample["test"]) + [{"_id": 999999, "imgs": []}])
    steps = [
        ["cdiscount", "prepare", sample["train"], "--out", str(rec),
         "--category-names", names, "--dedup", *workers],
        ["cdiscount", "prepare-test", str(test_bson), "--out", str(testrec), *workers],
        ["train", "--preset", "cdiscount", "--set", f"data.train={rec}",
         "--out", str(run),
         # A tiny model and a few steps: this checks the flow, not accuracy.
         "--set", "model.weights=none", "--set", "model.backbone=tiny-cnn",
         "--set", f"data.image_size={SIZE}", "--set", "batch_size=16",
         "--set", "epochs=1", "--set", "steps_per_epoch=3"],
        ["predict", "--run", str(run), "--data", str(testrec),
         "--format", "cdiscount", "--tta", "identity,flip_lr",
         "--out", str(tmp_path / "submission.csv")],
    ]  # fmt: skip
    for argv in steps:
        assert main(argv) == 0, argv
    metrics = json.loads((run / "metrics.json").read_text())
    valid = json.loads((rec / "valid" / "manifest.json").read_text())
    assert metrics["valid_images"] == valid["total"]  # our split, not a hold-out

    label_map = json.loads((run / "label_map.json").read_text())
    truth = pd.read_csv(sample["test_truth"], dtype=str)
    ids = truth["_id"].tolist() + ["999999"]
    sub = validate_cdiscount_submission(tmp_path / "submission.csv", ids, label_map)
    assert sub["_id"].tolist() == ids  # each test product once, in file order
    # The class map follows category_names.csv, which also lists categories never
    # sold: a one-step model may answer any of them, and nothing outside the file.
    listed = set(pd.read_csv(names, dtype=str).category_id)
    assert set(label_map) == listed > {str(c) for c in SAMPLE_CATEGORY_IDS}
    assert set(sub["category_id"]) <= listed
    # Test products that repeat a training product are answered by the MD5
    # dictionary with the training category, whatever the one-step model says.
    train_sets = {}
    for d in _docs(sample["train"]):
        key = frozenset(hashlib.md5(i["picture"]).digest() for i in d["imgs"])
        train_sets.setdefault(key, set()).add(str(d["category_id"]))
    answer = sub.set_index("_id")["category_id"]
    copies = 0
    for d in _docs(sample["test"]):
        key = frozenset(hashlib.md5(i["picture"]).digest() for i in d["imgs"])
        if len(train_sets.get(key, ())) == 1:
            copies += 1
            assert answer[str(d["_id"])] == next(iter(train_sets[key]))
    assert copies > 0


def test_generated_sample_is_real_bson_with_real_jpegs(sample):
    import io

    from PIL import Image

    docs = _docs(sample["train"])
    assert len(docs) == sample["train_products"]
    assert {len(d["imgs"]) for d in docs} <= {1, 2, 3, 4}
    img = Image.open(io.BytesIO(docs[0]["imgs"][0]["picture"]))
    assert img.format == "JPEG" and img.size == (SIZE, SIZE)
    assert all("category_id" not in d for d in _docs(sample["test"]))
    assert sample["duplicates"] > 0 and sample["conflicts"] > 0
    assert sample["test_product_copies"] > 0
