"""Cdiscount's ``train.bson`` / ``test.bson`` to TFRecords: ``shopee-tpu cdiscount``.

``prepare_cdiscount`` does what the 3rd place's scripts did, in two streaming reads
of the file and constant memory per product:

1. **Scan** (:func:`~shopee_tpu.cdiscount.plan.scan_bson`): ids, categories,
   byte offsets and image MD5s, saved as ``index.npz`` (random access; reused when a
   conversion is resumed).
2. **Plan**: class ids from ``category_names.csv`` (``categories.csv`` beside the
   records joins them to the names), the seeded product split (0.95/0.05, seed
   12648430 = DATASET_A, 1 = DATASET_B), and with ``dedup`` the duplicate plan
   (DATASET_C). The MD5 dictionary of all training images is saved as ``md5.npz``.
3. **Write**: the training side into ``out_dir`` and the validation side into
   ``out_dir/valid`` (``cdiscount_shards``), through the records writer
   (``ShardWriter``, ``WorkerPool``,
   the manifest). Each shard takes a fixed set of products and its worker process
   reads them from the file by offset, in file order: shards are written in
   parallel, renamed into place when complete, and a rerun skips finished ones.

Records hold the JPEG bytes, the class id, ``id = "<_id>-<image index>"`` and
``group = "<_id>"``. The training manifest names the validation records
(``"valid": "valid"``), which ``train`` uses when ``data.valid`` is unset, and the
MD5 dictionary (``"md5_dictionary"``), which ``predict`` applies.
``prepare_cdiscount_test`` writes test records plus ``products.csv``, the list of
every test product (the ids a submission must hold, images or not).
"""

from __future__ import annotations

import glob
import math
import os
import time

import numpy as np

from shopee_tpu import fs
from shopee_tpu.cdiscount.plan import (
    NO_CATEGORY,
    BsonIndex,
    category_map,
    dedup_plan,
    scan_bson,
    split_products,
)
from shopee_tpu.cdiscount.shards import INDEX, write_products
from shopee_tpu.data import manifests
from shopee_tpu.data.write.images import RESIZE_MODES
from shopee_tpu.data.write.records import writer_processes
from shopee_tpu.inference.md5 import build_md5_dictionary

__all__ = [
    "prepare_cdiscount",
    "prepare_cdiscount_test",
    "read_categories",
    "DATASET_A_SEED",
    "DATASET_B_SEED",
]

DATASET_A_SEED = 12648430  # 0xC0FFEE
DATASET_B_SEED = 1
VALID_DIR = "valid"
MD5_DICTIONARY = "md5.npz"
CATEGORIES = "categories.csv"
PRODUCTS = "products.csv"
_IMAGES_PER_SHARD = 20_000  # ~100 MB of Cdiscount's 180-px JPEGs


def prepare_cdiscount(
    train_bson: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    category_names: str | os.PathLike | None = None,
    valid_fraction: float = 0.05,
    seed: int = DATASET_A_SEED,
    dedup: bool = False,
    drop_conflicts: bool = False,
    shards: int | None = None,
    workers: int | None = None,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Converts Cdiscount's ``train.bson`` into training and validation records.

    Args:
        train_bson: The BSON file (``train.bson`` or ``train_example.bson``).
        out_dir: Training records, ``manifest.json``, ``categories.csv``,
            ``md5.npz``, ``index.npz``; validation records in ``out_dir/valid``.
        category_names: ``category_names.csv``: fixes the class ids (file order) and
            names them. Without it class ids follow the sorted category ids.
        valid_fraction: Share of products on the validation side (0: none).
        seed: Split seed: 12648430 (DATASET_A), 1 (DATASET_B).
        dedup: Write each distinct training image once (by MD5; DATASET_C).
        drop_conflicts: Also drop training images whose MD5 carries several
            categories.
        shards: Training shards (default: about 20,000 images each, at least 8).
        workers: Writer processes (default: the CPU count).
        image_size, resize, quality: Resize on write (``None`` keeps the 180-px
            originals byte for byte).
        overwrite: Replace other records in ``out_dir``.
        verbose: Print progress.

    Returns:
        The training manifest; ``manifest["cdiscount"]`` holds the counts (products,
        split, duplicates dropped, skipped input) and timings.

    Raises:
        BsonFormatError: Truncated or corrupt file (byte offset and products named).
        ValueError: Bad settings, no labelled product, or ``out_dir`` holding other
            records while ``overwrite`` is false.
    """
    train_bson, out_dir = os.fspath(train_bson), os.fspath(out_dir)
    say, start, index = _begin(train_bson, out_dir, shards, resize, overwrite, verbose)
    classes, label_map, table, keep_train, keep_valid, summary = _plan(
        index, train_bson, category_names, valid_fraction, seed, dedup, drop_conflicts
    )
    summary["md5"] = _save_md5_dictionary(index, classes, label_map, out_dir, say)
    _save_categories(out_dir, table, index, classes, keep_train, keep_valid)
    common = dict(
        index=index, classes=classes, label_map=label_map, test=False,
        image_size=image_size, resize=resize, quality=quality, seed=seed,
        workers=writer_processes(workers), overwrite=overwrite, say=say,
    )  # fmt: skip
    t_write = time.monotonic()
    manifest, valid_manifest = _write_sides(
        out_dir, keep_train, keep_valid, shards, summary, common
    )
    seconds = time.monotonic() - start
    timing = {
        "seconds": round(seconds, 2),
        "write_seconds": round(time.monotonic() - t_write, 2),
        "products_per_sec": round(len(index.ids) / seconds, 1),
        "images_per_sec": round(len(index.empty) / seconds, 1),
    }
    manifest["cdiscount"]["timing"] = timing
    manifests.finish(out_dir, manifest)
    say(_report(out_dir, summary, timing, manifest, valid_manifest))
    return manifest


def prepare_cdiscount_test(
    test_bson: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shards: int | None = None,
    workers: int | None = None,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Converts Cdiscount's ``test.bson`` into test records and ``products.csv``.

    Every image of every product is written (label -1; ``id = "<_id>-<index>"``,
    ``group = "<_id>"``). ``products.csv`` (``_id,images,usable_images``) lists every
    product in file order, including any without a usable image, so the submission
    can hold each test product exactly once. A ``category_id`` in the file is
    ignored. See :func:`prepare_cdiscount` for the other arguments.
    """
    test_bson, out_dir = os.fspath(test_bson), os.fspath(out_dir)
    say, start, index = _begin(test_bson, out_dir, shards, resize, overwrite, verbose)
    keep = ~index.empty
    workers = writer_processes(workers)
    products = "_id,images,usable_images\n" + "".join(
        f"{i},{n},{u}\n"
        for i, n, u in zip(
            index.ids.tolist(),
            index.n_images.tolist(),
            index.usable_images().tolist(),
        )
    )
    os.makedirs(out_dir, exist_ok=True)
    fs.write_text(os.path.join(out_dir, PRODUCTS), products)
    extra = {
        "cdiscount": {"source": os.path.basename(test_bson), "input": index.stats},
        "products": PRODUCTS,
        "index": INDEX,
    }
    manifest = write_products(
        keep, out_dir, "test", shards or _auto_shards(int(keep.sum()), 1),
        index=index, classes=np.full(len(index.ids), -1), label_map={}, test=True,
        image_size=image_size, resize=resize, quality=quality, seed=0,
        workers=workers, overwrite=overwrite, say=say, extra=extra,
    )  # fmt: skip
    seconds = time.monotonic() - start
    manifest["cdiscount"]["timing"] = {
        "seconds": round(seconds, 2),
        "products_per_sec": round(len(index.ids) / seconds, 1),
        "images_per_sec": round(len(index.empty) / seconds, 1),
    }
    manifests.finish(out_dir, manifest)
    stats = index.stats
    say(
        f"{out_dir}: {manifest['total']} test images of {stats['products']} products "
        f"in {len(manifest['shards'])} shards; skipped: {stats['empty_pictures']} "
        f"empty pictures, {stats['products_without_usable_images']} products without "
        f"a usable image (still listed in {PRODUCTS}), {manifest['num_skipped']} "
        f"unreadable JPEGs; {seconds:.1f} s"
    )
    return manifest


def read_categories(records_dir: str | os.PathLike):
    """The ``categories.csv`` of prepared training records: ``class_id,
    category_id, category_level1..3, train_images, valid_images``."""
    import pandas as pd

    path = os.path.join(os.fspath(records_dir), CATEGORIES)
    return pd.read_csv(path, dtype={"category_id": str}, keep_default_na=False)


# ---------------------------------------------------------------------------
# Helpers.


def _begin(source: str, out_dir: str, shards, resize, overwrite: bool, verbose: bool):
    """Checks the settings and ``out_dir``, then scans ``source`` (or reuses its
    index); returns ``(say, start time, index)``."""
    _check_settings(shards, resize)
    say = print if verbose else _quiet
    start = time.monotonic()
    _refuse_foreign(out_dir, source, overwrite)
    return say, start, _index(source, out_dir, say)


def _plan(
    index, train_bson, category_names, valid_fraction, seed, dedup, drop_conflicts
):
    """Class ids, the product split and the duplicate plan: ``(classes, label_map,
    category table, training images kept, validation images kept, summary)``."""
    # Warns (with the count) about categories category_names.csv lacks.
    label_map, table, missing = category_map(index.categories, category_names)
    if not label_map:
        raise ValueError(f"{train_bson}: no product has a category_id (a test file?)")
    classes = _classes(index.categories, label_map)
    labelled = (classes >= 0) & (index.usable_images() > 0)
    valid = np.zeros(len(classes), bool)
    valid[labelled] = split_products(index.ids[labelled], valid_fraction, seed)
    train_side = labelled & ~valid
    keep_train, dedup_counts = dedup_plan(
        index, classes, train_side, dedup=dedup, drop_conflicts=drop_conflicts
    )
    keep_valid, _ = dedup_plan(index, classes, valid, dedup=False, drop_conflicts=False)
    summary = {
        "source": os.path.basename(train_bson),
        "input": index.stats,
        "split": {
            "valid_fraction": valid_fraction,
            "seed": seed,
            "method": "keyed BLAKE2b hash of _id, smallest first",
            "train_products": int(train_side.sum()),
            "valid_products": int(valid.sum()),
            "train_images": int(keep_train.sum()),
            "valid_images": int(keep_valid.sum()),
        },
        "dedup": {"enabled": dedup, "drop_conflicts": drop_conflicts, **dedup_counts},
        "categories": {
            "file": CATEGORIES,
            "classes": len(label_map),
            "missing_from_category_names": missing,
        },
    }
    return classes, label_map, table, keep_train, keep_valid, summary


def _save_md5_dictionary(
    index: BsonIndex, classes: np.ndarray, label_map: dict, out_dir: str, say
) -> dict:
    """Saves the MD5 dictionary of all labelled images; returns its stats."""
    t_md5 = time.monotonic()
    dictionary = build_md5_dictionary(
        _labelled_images(index, classes), label_map=label_map
    )
    os.makedirs(out_dir, exist_ok=True)
    dictionary.save(os.path.join(out_dir, MD5_DICTIONARY))
    say(f"md5 dictionary: {dictionary.stats} ({time.monotonic() - t_md5:.1f} s)")
    return dictionary.stats


def _save_categories(out_dir, table, index, classes, keep_train, keep_valid) -> None:
    """Writes ``categories.csv``: the category table with images per side."""

    def count(keep):
        return np.bincount(classes[index.image_product[keep]], minlength=len(table))

    table = table.assign(train_images=count(keep_train), valid_images=count(keep_valid))
    fs.write_text(
        os.path.join(out_dir, CATEGORIES),
        table.to_csv(index=False, lineterminator="\n"),
    )


def _write_sides(out_dir, keep_train, keep_valid, shards, summary, common):
    """Writes the training records, then the validation ones (if any) into
    ``out_dir/valid`` with shards in proportion; returns both manifests."""
    n_train = int(keep_train.sum())
    n_shards = shards or _auto_shards(n_train, 8)
    n_valid_shards = max(1, math.ceil(n_shards * keep_valid.sum() / max(1, n_train)))
    extra = {
        "cdiscount": summary,
        "valid": VALID_DIR if keep_valid.any() else None,
        "md5_dictionary": MD5_DICTIONARY,
        "index": INDEX,
    }
    # The training side first: its manifest check refuses a folder holding other
    # records before anything is written there.
    manifest = write_products(
        keep_train, out_dir, "train", n_shards, extra=extra, **common
    )
    valid_manifest = None
    if keep_valid.any():
        valid_manifest = write_products(
            keep_valid, os.path.join(out_dir, VALID_DIR), "valid",
            min(n_valid_shards, n_shards), extra={}, **common,
        )  # fmt: skip
    return manifest, valid_manifest


def _index(path: str, out_dir: str, say) -> BsonIndex:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such BSON file")
    saved = os.path.join(out_dir, INDEX)
    index = BsonIndex.load_for(saved, path)
    if index is not None:
        say(
            f"{path}: reusing the index in {saved} ({index.stats['products']} products)"
        )
        return index

    def progress(p: dict) -> None:
        gb, total = p["bytes"] / 1e9, p["size"] / 1e9
        mbs = p["bytes"] / 1e6 / max(p["seconds"], 1e-9)
        if p["bytes"] >= p["size"]:
            return  # the summary below follows
        left = (p["size"] - p["bytes"]) / 1e6 / max(mbs, 1e-9)
        say(
            f"scan {os.path.basename(path)}: {gb:.2f}/{total:.2f} GB "
            f"({100 * p['bytes'] / max(1, p['size']):.0f}%), {p['products']:,} products, "
            f"{p['images']:,} images, {mbs:.0f} MB/s, ~{left / 60:.0f} min left"
        )

    index = scan_bson(path, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    index.save(saved)
    s = index.stats
    say(
        f"scanned {path}: {s['products']:,} products, {s['images']:,} images in "
        f"{s['seconds']:.1f} s ({index.size / 1e6 / max(s['seconds'], 1e-9):.0f} MB/s); "
        f"index in {saved}"
    )
    return index


def _labelled_images(index: BsonIndex, classes: np.ndarray, chunk: int = 1 << 16):
    """``(md5 hex, class id, product id)`` of every labelled picture, made a chunk at
    a time (a list of all of them would cost ~70 bytes an image)."""
    image_product = index.image_product
    for lo in range(0, len(image_product), chunk):
        products = image_product[lo : lo + chunk]
        usable = ~index.empty[lo : lo + chunk] & (classes[products] >= 0)
        digests = index.digests[lo : lo + chunk][usable]
        products = products[usable]
        yield from zip(
            (d.hex() for d in digests.view("V16").ravel().tolist()),
            classes[products].tolist(),
            map(str, index.ids[products].tolist()),
        )


def _refuse_foreign(out_dir: str, source: str, overwrite: bool) -> None:
    """Fails before the scan, not after it, when ``out_dir`` holds other records
    (the manifest check of each side is the full one)."""
    if overwrite or not os.path.isdir(out_dir):
        return
    try:
        old = manifests.read_manifest(out_dir)
    except FileNotFoundError:
        old = None
    mine = old is not None and (old.get("cdiscount") or {}).get("source") == (
        os.path.basename(source)
    )
    if not mine and (old is not None or glob.glob(os.path.join(out_dir, "*.tfrec"))):
        raise ValueError(
            f"{out_dir} already holds other records (not converted from "
            f"{os.path.basename(source)}); pass overwrite=True (--overwrite) to "
            "replace them"
        )


def _classes(categories: np.ndarray, label_map: dict) -> np.ndarray:
    """Class id per product (-1: no category)."""
    keys = np.array(sorted(int(k) for k in label_map), np.int64)
    values = np.array([label_map[str(k)] for k in keys], np.int64)
    pos = np.clip(np.searchsorted(keys, categories), 0, len(keys) - 1)
    found = (keys[pos] == categories) & (categories != NO_CATEGORY)
    return np.where(found, values[pos], -1)


def _auto_shards(images: int, at_least: int) -> int:
    return max(at_least, math.ceil(images / _IMAGES_PER_SHARD))


def _check_settings(shards, resize) -> None:
    if shards is not None and shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def _quiet(*_args, **_kwargs) -> None:
    pass


def _report(out_dir, summary, timing, manifest, valid_manifest) -> str:
    split, dd, cats = summary["split"], summary["dedup"], summary["categories"]
    inp = summary["input"]
    valid = (
        f"; valid: {valid_manifest['total']} images of {split['valid_products']} "
        f"products in {len(valid_manifest['shards'])} shards ({VALID_DIR}/)"
        if valid_manifest
        else ""
    )
    dedup = (
        f"; dedup dropped {dd['duplicates_dropped']} duplicates"
        + (
            f" and {dd['conflicts_dropped']} conflicting"
            if dd["drop_conflicts"]
            else ""
        )
        if dd["enabled"] or dd["drop_conflicts"]
        else ""
    )
    return (
        f"{out_dir}: train: {manifest['total']} images of {split['train_products']} "
        f"products in {len(manifest['shards'])} shards{valid}{dedup}; "
        f"{cats['classes']} classes ({cats['missing_from_category_names']} missing "
        f"from category names); skipped: {inp['products_without_imgs']} products "
        f"without imgs, {inp['empty_pictures']} empty pictures, "
        f"{inp['products_without_category']} without category_id, "
        f"{manifest['num_skipped']} unreadable JPEGs; {timing['seconds']:.1f} s "
        f"({timing['products_per_sec']:,.0f} products/s)"
    )
