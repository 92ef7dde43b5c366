"""The MD5 duplicate dictionary: exact copies of training images (and products)
answer themselves at prediction time.

In Cdiscount about 37 % of the training images were byte-identical repeats, and test
images repeated training ones. The 3rd place replaced the prediction of a test image
whose MD5 was known with a single label by a one-hot vector (+0.003 to +0.005 private
LB), and overwrote a product's answer when the sorted set of its image MD5s matched a
training product (+0.0005). Hashes seen with several labels (114,209 in Cdiscount)
are conflicts: counted, reported and never used.

Storage is compact: 16-byte binary digests, sorted, with an int32 label each (``-1``
marks a conflict), in one ``.npz``; lookups are binary searches. The image digest is
the MD5 of the original file bytes (the ``md5`` field of our TFRecords); a product's
digest is the MD5 of its distinct image digests, sorted and concatenated.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shopee_tpu import fs
from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.read import pipeline

__all__ = [
    "Md5Dictionary",
    "build_md5_dictionary",
    "build_from_records",
    "product_digest",
    "apply_image_overrides",
    "apply_product_overrides",
    "CONFLICT",
    "MISSING",
]

MISSING = -1  # lookup result: hash not in the dictionary
CONFLICT = -2  # lookup result: hash seen with more than one label
_JPEG_OR_PNG = (b"\xff\xd8", b"\x89PNG")


def _digest(value, where: str) -> bytes:
    """16 raw bytes from a hex MD5 (str or bytes), raw digest or image bytes."""
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != 16:
            raise ValueError(f"{where}: md5 {value!r} is not 32 hex digits")
        return raw
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value)
        if len(value) == 16 and not value.startswith(_JPEG_OR_PNG):
            return value
        if len(value) == 32:
            try:
                return bytes.fromhex(value.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                pass
        return hashlib.md5(value).digest()  # image file bytes
    raise ValueError(f"{where}: expected an md5 hex string or bytes, got {type(value)}")


def product_digest(md5s: Iterable) -> bytes:
    """The product key: MD5 of its distinct image digests, sorted and joined."""
    raw = sorted({_digest(m, "product md5") for m in md5s})
    return hashlib.md5(b"".join(raw)).digest()


def _as_void(raw: bytes | np.ndarray) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        return np.ascontiguousarray(raw, np.uint8).reshape(-1, 16).view("V16").ravel()
    return np.frombuffer(raw, dtype="V16")


def _index(keys: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Unique sorted keys with their label, ``-1`` where a key has several labels
    (or an item was already ambiguous, label -1); returns the conflict count."""
    if len(keys) == 0:
        return keys, np.zeros(0, np.int32), 0
    uniq, inverse = np.unique(keys, return_inverse=True)
    shifted = labels.astype(np.int64) + 1  # 0 marks an already ambiguous item
    base = int(shifted.max()) + 1
    pairs = np.unique(inverse.ravel().astype(np.int64) * base + shifted)
    owner, label = pairs // base, pairs % base
    n_labels = np.bincount(owner, minlength=len(uniq))
    out = np.full(len(uniq), -1, np.int32)
    single = (n_labels[owner] == 1) & (label > 0)
    out[owner[single]] = label[single] - 1
    return uniq, out, int(np.sum(out < 0))


@dataclass
class Md5Dictionary:
    """Sorted image and product digests with their labels (``-1``: conflict).

    Attributes:
        image_keys, image_labels: One row per distinct image MD5.
        product_keys, product_labels: One row per distinct product digest.
        stats: Counts from the build (images, distinct, conflicts...).
        label_map: ``{category: class_id}`` the labels refer to, when known.
    """

    image_keys: np.ndarray
    image_labels: np.ndarray
    product_keys: np.ndarray
    product_labels: np.ndarray
    stats: dict = field(default_factory=dict)
    label_map: dict | None = None

    @staticmethod
    def _find(keys: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.full(len(query), MISSING, np.int32)
        pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
        hit = keys[pos] == query
        found = np.where(labels[pos] >= 0, labels[pos], CONFLICT)
        return np.where(hit, found, MISSING).astype(np.int32)

    def lookup_images(self, md5s: Sequence) -> np.ndarray:
        """Label per image MD5: the class id, ``MISSING`` (-1) or ``CONFLICT`` (-2)."""
        raw = b"".join(_digest(m, f"md5 #{i}") for i, m in enumerate(md5s))
        return self._find(self.image_keys, self.image_labels, _as_void(raw))

    def lookup_products(self, products: Sequence[Sequence]) -> np.ndarray:
        """Label per product given as the list of its image MD5s (see lookup_images)."""
        raw = b"".join(product_digest(p) for p in products)
        return self._find(self.product_keys, self.product_labels, _as_void(raw))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the dictionary to a compressed ``.npz``, atomically."""

        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            image_keys=self.image_keys.view(np.uint8).reshape(-1, 16),
            image_labels=self.image_labels,
            product_keys=self.product_keys.view(np.uint8).reshape(-1, 16),
            product_labels=self.product_labels,
            stats=np.array(json.dumps(self.stats)),
            label_map=np.array(json.dumps(self.label_map)),
        )
        fs.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Md5Dictionary:
        with np.load(path, allow_pickle=False) as z:
            if "image_keys" not in z.files:
                raise ValueError(f"{path}: not an MD5 dictionary (no image_keys)")
            return cls(
                _as_void(z["image_keys"]),
                z["image_labels"].astype(np.int32),
                _as_void(z["product_keys"]),
                z["product_labels"].astype(np.int32),
                json.loads(str(z["stats"])),
                json.loads(str(z["label_map"])),
            )


def _rows(items) -> Iterable[tuple]:
    """(md5, label, group) rows from a DataFrame or an iterable of tuples."""
    if hasattr(items, "columns"):
        if "md5" not in items.columns or "label" not in items.columns:
            raise ValueError(
                f"need columns md5,label[,group]; got {list(items.columns)}"
            )
        groups = items["group"] if "group" in items.columns else [""] * len(items)
        return zip(items["md5"], items["label"], groups, strict=True)
    return ((t[0], t[1], t[2] if len(t) > 2 else "") for t in items)


def build_md5_dictionary(items, *, label_map: dict | None = None) -> Md5Dictionary:
    """Builds the dictionary in one streaming pass over training items.

    Args:
        items: A DataFrame with columns ``md5``, ``label`` and optionally ``group``
            (``shopee_tpu.data.read.pipeline.read_ids_labels(train_files)``), or an
            iterable of ``(md5_or_image_bytes, label[, group])`` tuples. ``md5`` may
            be a 32-digit hex string, 16 raw bytes or the image file's bytes. Items
            with an empty group are indexed as images only.
        label_map: The ``{category: class_id}`` the labels refer to (kept with the
            dictionary so a mismatched run can be refused).

    Returns:
        The dictionary; ``stats`` counts images, distinct MD5s, conflicts, products.
    """
    digests = bytearray()
    labels = array.array("q")
    group_hash = array.array("Q")  # 0 = no group
    for i, (md5, label, group) in enumerate(_rows(items)):
        label = int(label)
        if label < 0:
            raise ValueError(f"item {i}: label {label} (unlabeled) in training items")
        digests += _digest(md5, f"item {i}")
        labels.append(label)
        g = group.decode() if isinstance(group, bytes) else str(group or "")
        h = int.from_bytes(hashlib.md5(g.encode()).digest()[:8], "big") if g else 0
        group_hash.append(h or (1 if g else 0))
    keys = _as_void(bytes(digests))
    labels_np = (
        np.frombuffer(labels, dtype=np.int64) if len(labels) else np.zeros(0, np.int64)
    )
    image_keys, image_labels, image_conflicts = _index(keys, labels_np)

    groups_np = (
        np.frombuffer(group_hash, dtype=np.uint64)
        if len(group_hash)
        else np.zeros(0, np.uint64)
    )
    has = groups_np != 0
    p_keys, p_labels = _products(keys[has], labels_np[has], groups_np[has])
    product_keys, product_labels, product_conflicts = _index(p_keys, p_labels)
    stats = {
        "images": len(labels_np),
        "distinct_images": len(image_keys),
        "image_conflicts": image_conflicts,
        "products": len(p_keys),
        "distinct_products": len(product_keys),
        "product_conflicts": product_conflicts,
    }
    return Md5Dictionary(
        image_keys, image_labels, product_keys, product_labels, stats, label_map
    )


def _products(keys, labels, groups) -> tuple[np.ndarray, np.ndarray]:
    """One digest and label per group; a group whose images carry different
    labels gets -1 (ambiguous)."""
    if len(keys) == 0:
        return np.zeros(0, "V16"), np.zeros(0, np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    inv = inv.ravel()
    order = np.lexsort((inv, groups))  # by group, then by digest
    g_sorted, inv_sorted, lab_sorted = groups[order], inv[order], labels[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    raw_uniq = uniq.view(np.uint8).reshape(-1, 16)
    out_keys = bytearray()
    out_labels = np.empty(len(starts), np.int64)
    for j, (s, e) in enumerate(zip(starts, ends, strict=True)):
        members = np.unique(inv_sorted[s:e])  # distinct digests, sorted
        out_keys += hashlib.md5(raw_uniq[members].tobytes()).digest()
        labs = lab_sorted[s:e]
        out_labels[j] = labs[0] if np.all(labs == labs[0]) else -1
    return _as_void(bytes(out_keys)), out_labels


def _one_hot(probs: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.array(probs, dtype=np.float32, copy=True)
    if len(rows) and labels.max() >= out.shape[1]:
        raise ValueError(
            f"MD5 dictionary label {int(labels.max())} is outside the {out.shape[1]} "
            "classes of the predictions: built with another label map?"
        )
    out[rows] = 0.0
    out[rows, labels] = 1.0
    return out


def apply_image_overrides(probs, md5s: Sequence, dictionary: Md5Dictionary):
    """One-hot rows for test images whose MD5 is known with a single label.

    Returns:
        ``(probs, stats)``; stats counts ``images``, ``hits`` (overridden),
        ``conflicts`` (known but ambiguous, left alone) and ``changed`` (hits whose
        top class changed).
    """
    probs = np.asarray(probs, np.float32)
    if len(md5s) != len(probs):
        raise ValueError(f"{len(md5s)} md5s for {len(probs)} probability rows")
    found = dictionary.lookup_images(md5s)
    rows = np.flatnonzero(found >= 0)
    out = _one_hot(probs, rows, found[rows])
    stats = {
        "images": len(probs),
        "hits": len(rows),
        "conflicts": int(np.sum(found == CONFLICT)),
        "changed": int(np.sum(probs[rows].argmax(1) != found[rows]))
        if len(rows)
        else 0,
    }
    return out, stats


def apply_product_overrides(
    keys: Sequence,
    product_probs,
    groups: Sequence,
    md5s: Sequence,
    dictionary: Md5Dictionary,
):
    """Overwrites a product's prediction when its exact image set is a known product.

    Args:
        keys: Product keys, one per row of ``product_probs`` (``aggregate_products``).
        product_probs: ``[products, classes]``.
        groups, md5s: Product key and MD5 of every test image.
        dictionary: The training dictionary.

    Returns:
        ``(product_probs, stats)`` with ``products``, ``hits``, ``conflicts``, ``changed``.
    """
    product_probs = np.asarray(product_probs, np.float32)
    members: dict = {}
    for g, m in zip(np.asarray(groups).tolist(), md5s, strict=True):
        members.setdefault(g, []).append(m)
    keys = np.asarray(keys).tolist()
    missing = [k for k in keys if k not in members]
    if missing:
        raise ValueError(f"products without images: {missing[:5]}")
    found = dictionary.lookup_products([members[k] for k in keys])
    rows = np.flatnonzero(found >= 0)
    out = _one_hot(product_probs, rows, found[rows])
    changed = product_probs[rows].argmax(1) != found[rows] if len(rows) else []
    stats = {
        "products": len(keys),
        "hits": len(rows),
        "conflicts": int(np.sum(found == CONFLICT)),
        "changed": int(np.sum(changed)),
    }
    return out, stats


def build_from_records(
    files, *, schema: str = "shopee_tpu", verbose: bool = True
) -> Md5Dictionary:
    """The dictionary of a set of training TFRecords (one scan, no image decode),
    with the label map of their manifest when there is one; ``verbose`` shows the
    scan's progress."""
    files = pipeline.list_files(files)
    label_map = None
    try:
        label_map = read_manifest(os.path.dirname(files[0]) or ".").get("label_map")
    except (FileNotFoundError, IndexError):
        pass
    return build_md5_dictionary(
        pipeline.read_ids_labels(files, schema=schema, verbose=verbose),
        label_map=label_map,
    )
