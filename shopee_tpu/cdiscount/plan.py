"""Planning a Cdiscount conversion: one scan of the BSON file, then the class map, the
seeded product split and the duplicate plan, all as compact numpy arrays.

The scan streams the file once (:func:`~shopee_tpu.cdiscount.bson_reader.iter_products`)
and keeps, per product, its id, category, byte offset and length, and per image the
MD5 of its JPEG bytes: about 30 bytes a product and 17 an image (about 0.4 GB for
the 7.07 M products and 12.4 M images of ``train.bson``), never an image. That
:class:`BsonIndex` gives random access to any product, the categories before the
first record is written (class ids must be fixed by then), the MD5 dictionary and the
duplicate plan of ``--dedup``, whose "conflicting labels" test needs every label of
an MD5 before deciding. It is saved beside the records, so a resumed conversion
does not scan the file again.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shopee_tpu import fs
from shopee_tpu.cdiscount.bson_reader import (
    BsonFormatError,
    iter_products,
    read_product,
)

__all__ = [
    "BsonIndex",
    "scan_bson",
    "category_map",
    "split_products",
    "dedup_plan",
    "NO_CATEGORY",
]

NO_CATEGORY = -1  # category of a test product (or a train product without one)
_INDEX_VERSION = 1
_ARRAYS = ("ids", "categories", "offsets", "lengths", "n_images", "digests", "empty")


@dataclass
class BsonIndex:
    """What one scan learns about a BSON file (see the module docstring).

    Attributes:
        path: The BSON file; ``size`` and ``mtime_ns`` identify its version.
        ids, categories, offsets, lengths, n_images: One entry per product, in file
            order (``categories`` is ``NO_CATEGORY`` when absent; ``n_images``
            counts the entries of ``imgs``, empty ones included).
        digests: ``[images, 16]`` MD5 of each ``imgs`` entry, in file order (zeros
            for an empty picture); ``empty`` marks those.
    """

    path: str
    size: int
    mtime_ns: int
    ids: np.ndarray
    categories: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    n_images: np.ndarray
    digests: np.ndarray
    empty: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def image_product(self) -> np.ndarray:
        """The product (row) of every image."""
        return np.repeat(np.arange(len(self.ids)), self.n_images)

    def usable_images(self) -> np.ndarray:
        """Non-empty pictures per product."""
        counts = np.zeros(len(self.ids), np.int64)
        np.add.at(counts, self.image_product[~self.empty], 1)
        return counts

    def read(self, product_id: int):
        """Reads one product from the file by its ``_id`` (random access)."""
        rows = np.flatnonzero(self.ids == product_id)
        if not len(rows):
            raise KeyError(f"{self.path}: no product with _id {product_id}")
        r = int(rows[0])
        with open(self.path, "rb") as f:
            return read_product(
                f, int(self.offsets[r]), int(self.lengths[r]), where=self.path
            )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to an ``.npz``, atomically."""
        meta = {
            "version": _INDEX_VERSION,
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "stats": self.stats,
        }
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        with fs.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load_for(cls, path: str | os.PathLike, bson_path: str) -> BsonIndex | None:
        """The saved index of ``bson_path``, or ``None`` when absent or stale (the
        file's size or modification time differ, or it came from another file)."""
        if not os.path.exists(path):
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            stat = os.stat(bson_path)
            if (
                meta.get("version") != _INDEX_VERSION
                or os.path.basename(meta["path"]) != os.path.basename(bson_path)
                or meta["size"] != stat.st_size
                or meta["mtime_ns"] != stat.st_mtime_ns
            ):
                return None
            arrays = {name: z[name] for name in _ARRAYS}
        return cls(
            os.fspath(bson_path), meta["size"], meta["mtime_ns"], **arrays,
            stats=meta["stats"],
        )  # fmt: skip


def scan_bson(
    path: str | os.PathLike,
    *,
    progress: Callable[[dict], None] | None = None,
    every: float = 10.0,
) -> BsonIndex:
    """Streams a Cdiscount BSON file once and returns its :class:`BsonIndex`.

    Args:
        path: The BSON file.
        progress: Called about every ``every`` seconds and at the end with
            ``{"bytes", "size", "products", "images", "seconds"}``.
        every: Seconds between progress calls.

    Raises:
        BsonFormatError: Truncated or corrupt file (byte offset and products read
            named), or a product id that appears twice.
    """
    path = os.fspath(path)
    stat = os.stat(path)
    ids, cats, offs = array.array("q"), array.array("q"), array.array("q")
    lens, nimg = array.array("i"), array.array("h")
    digests, empty = bytearray(), bytearray()
    blank = bytes(16)
    start = last = time.monotonic()
    done = 0
    for p in iter_products(path):
        ids.append(p.id)
        cats.append(NO_CATEGORY if p.category_id is None else p.category_id)
        offs.append(p.offset)
        lens.append(p.length)
        nimg.append(len(p.pictures))
        for picture in p.pictures:
            digests += hashlib.md5(picture).digest() if picture else blank
            empty.append(0 if picture else 1)
        done = p.offset + p.length
        if progress is not None and time.monotonic() - last >= every:
            last = time.monotonic()
            progress(_progress(done, stat.st_size, len(ids), len(empty), start))
    if progress is not None:
        progress(_progress(done, stat.st_size, len(ids), len(empty), start))
    index = BsonIndex(
        path,
        stat.st_size,
        stat.st_mtime_ns,
        ids=np.frombuffer(ids, np.int64).copy(),
        categories=np.frombuffer(cats, np.int64).copy(),
        offsets=np.frombuffer(offs, np.int64).copy(),
        lengths=np.frombuffer(lens, np.int32).copy(),
        n_images=np.frombuffer(nimg, np.int16).copy(),
        digests=np.frombuffer(bytes(digests), np.uint8).reshape(-1, 16),
        empty=np.frombuffer(bytes(empty), np.uint8).astype(bool),
    )
    _check_unique_ids(index)
    usable = index.usable_images()
    index.stats = {
        "products": len(index.ids),
        "images": int(len(index.empty)),
        "empty_pictures": int(index.empty.sum()),
        "products_without_imgs": int(np.sum(index.n_images == 0)),
        "products_without_usable_images": int(np.sum(usable == 0)),
        "products_without_category": int(np.sum(index.categories == NO_CATEGORY)),
        "seconds": round(time.monotonic() - start, 2),
    }
    return index


def _progress(done, size, products, images, start) -> dict:
    return {
        "bytes": done,
        "size": size,
        "products": products,
        "images": images,
        "seconds": time.monotonic() - start,
    }


def _check_unique_ids(index: BsonIndex) -> None:
    uniq, first, counts = np.unique(index.ids, return_index=True, return_counts=True)
    if np.all(counts == 1):
        return
    dup = uniq[counts > 1]
    shown = ", ".join(
        f"{i} (bytes {', '.join(str(o) for o in index.offsets[index.ids == i][:3])})"
        for i in dup[:5]
    )
    raise BsonFormatError(
        f"{index.path}: {len(dup)} product id(s) appear more than once: {shown}"
    )


# ---------------------------------------------------------------------------
# Class map, split and duplicate plan.


def category_map(categories: np.ndarray, names_csv: str | os.PathLike | None = None):
    """Class ids for the categories seen in training, joined to their names.

    With ``category_names.csv`` (``category_id,category_level1,category_level2,
    category_level3``), class ids follow the file's row order (as the 3rd place
    did), so every conversion of every split shares one map. Categories seen in
    training but missing from the file get the next ids (sorted) and a warning with
    their count. Without the file, class ids follow the sorted category ids.

    Returns:
        ``(label_map, table, missing)``: ``{str(category_id): class_id}``; a
        DataFrame ``class_id, category_id, category_level1..3``; the count of
        categories missing from the file.

    Raises:
        ValueError: The file lacks ``category_id``, or has a non-integer or repeated
            category id (rows named).
    """
    import pandas as pd

    seen = np.unique(categories[categories != NO_CATEGORY])
    levels = ["category_level1", "category_level2", "category_level3"]
    if names_csv is None:
        table = pd.DataFrame({"category_id": seen})
        missing = 0
    else:
        names_csv = os.fspath(names_csv)
        table = pd.read_csv(names_csv, dtype=str, keep_default_na=False)
        if "category_id" not in table.columns:
            raise ValueError(
                f"{names_csv}: no category_id column (columns: {list(table.columns)})"
            )
        ok = table["category_id"].str.fullmatch(r"\d+")
        if not ok.all():
            rows = [
                f"line {i + 2}: {v!r}" for i, v in table["category_id"][~ok].items()
            ]
            raise ValueError(f"{names_csv}: non-integer category_id at {rows[:5]}")
        table["category_id"] = table["category_id"].astype(np.int64)
        dup = table["category_id"].duplicated(keep=False)
        if dup.any():
            rows = [f"line {i + 2}: {v}" for i, v in table["category_id"][dup].items()]
            raise ValueError(f"{names_csv}: repeated category_id at {rows[:6]}")
        extra = np.setdiff1d(seen, table["category_id"].to_numpy())
        missing = len(extra)
        if missing:
            warnings.warn(
                f"{names_csv}: {missing} categories seen in training are missing "
                f"(e.g. {extra[:5].tolist()}); they get class ids after the file's "
                f"{len(table)} rows, with no names",
                stacklevel=3,  # the caller of prepare_cdiscount
            )
            table = pd.concat(
                [table, pd.DataFrame({"category_id": extra})], ignore_index=True
            )
    for col in levels:
        if col not in table.columns:
            table[col] = ""
    table = table.fillna("")
    table.insert(0, "class_id", np.arange(len(table)))
    table = table[["class_id", "category_id", *levels]]
    label_map = {
        str(c): int(i) for i, c in zip(table["class_id"], table["category_id"])
    }
    return label_map, table, missing


def split_products(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The seeded product-level split: ``True`` for validation products.

    Each product id gets a keyed BLAKE2b hash (key: the seed); the
    ``round(fraction * n)`` products with the smallest hashes form the validation
    side. The result depends only on the ids, the fraction and the seed, not on the
    file order, the machine or the Python and numpy versions. Seeds as in the
    Cdiscount 3rd place: 12648430 (0xC0FFEE, DATASET_A and C) and 1 (DATASET_B).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"valid fraction must be in [0, 1), got {fraction}")
    n = len(ids)
    n_valid = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_valid = min(n - 1, max(1, n_valid))
    key = int(seed).to_bytes(16, "little", signed=True)
    hashes = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(b"%d" % i, key=key, digest_size=8).digest(), "little"
            )
            for i in ids.tolist()
        ),
        dtype=np.uint64,
        count=n,
    )
    valid = np.zeros(n, bool)
    if n_valid:
        valid[np.lexsort((ids, hashes))[:n_valid]] = True
    return valid


def dedup_plan(
    index: BsonIndex,
    class_of_product: np.ndarray,
    train_products: np.ndarray,
    *,
    dedup: bool,
    drop_conflicts: bool,
) -> tuple[np.ndarray, dict]:
    """Which images of the training side to write (DATASET_C of the 3rd place).

    Args:
        index: The scan.
        class_of_product: Class id per product (-1: none, never written).
        train_products: The products on the training side.
        dedup: Keep only the first copy (in file order) of each MD5.
        drop_conflicts: Drop every image whose MD5 carries more than one category
            anywhere in the file.

    Returns:
        ``(keep, counts)``: a mask over all images of the file (``True`` only on the
        training side), and the number of images the side had and each rule dropped.
    """
    product = index.image_product
    on_side = train_products[product] & (class_of_product[product] >= 0)
    keep = on_side & ~index.empty
    counts = {"images": int(keep.sum()), "duplicates_dropped": 0}
    if drop_conflicts:
        conflict = _conflicting(index, class_of_product)
        counts["conflicts_dropped"] = int(np.sum(keep & conflict))
        keep &= ~conflict
    if dedup:
        rows = np.flatnonzero(keep)
        keys = index.digests[rows].view("V16").ravel()
        _, first = np.unique(keys, return_index=True)
        first_copy = np.zeros(len(keep), bool)
        first_copy[rows[first]] = True
        counts["duplicates_dropped"] = int(np.sum(keep & ~first_copy))
        keep &= first_copy
    counts["kept"] = int(keep.sum())
    return keep, counts


def _conflicting(index: BsonIndex, class_of_product: np.ndarray) -> np.ndarray:
    """Images whose MD5 appears with more than one class in the whole file."""
    labels = class_of_product[index.image_product]
    usable = ~index.empty & (labels >= 0)
    rows = np.flatnonzero(usable)
    _, inverse = np.unique(index.digests[rows].view("V16").ravel(), return_inverse=True)
    inverse = inverse.ravel()
    pairs = np.unique(np.stack([inverse, labels[rows]], axis=1), axis=0)
    n_labels = np.bincount(pairs[:, 0], minlength=inverse.max(initial=-1) + 1)
    out = np.zeros(len(usable), bool)
    out[rows] = n_labels[inverse] > 1
    return out
