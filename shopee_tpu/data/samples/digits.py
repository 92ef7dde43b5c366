"""A real, labelled, offline dataset in the Shopee layout, from scikit-learn's digits.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits inside its wheel. This
module turns them into what a Shopee competition download looks like, so the whole
pipeline (CSV, nested image folders, TFRecords, training, TTA, products, MD5
duplicates, submission) runs end to end with no download:

    out/train.csv                     filename,category,group
    out/test.csv                      filename,category,group   (category: a placeholder)
    out/test_labels.csv               filename,category,group   (the held-out truth)
    out/train/train/train/NN/<md5>.jpg
    out/test/test/test/<md5>.jpg

Each "product" (``group``) holds 1-4 different scans of the same digit, so
product-level averaging has something to average. A small share of test images are
byte-identical copies of training images, as in Cdiscount, for the MD5 dictionary.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pandas as pd

__all__ = ["make_digits_dataset", "render_digit", "TEST_PLACEHOLDER"]

# The Shopee test.csv carries a placeholder category for every row.
TEST_PLACEHOLDER = "43"


def render_digit(digit: np.ndarray, size: int, rng: np.random.Generator) -> bytes:
    """Upscales one 8x8 scan (0..16) to a tinted RGB JPEG of ``size`` pixels."""
    from PIL import Image

    ink = digit.astype(np.float32) / 16.0
    # A random ink and paper colour per image makes the RGB channels carry real
    # variation without changing the label.
    paper = rng.uniform(170, 255, size=3)
    pen = rng.uniform(0, 90, size=3)
    rgb = (
        paper[None, None, :] * (1 - ink[..., None])
        + pen[None, None, :] * ink[..., None]
    )
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    img = img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _products(targets: np.ndarray, rng: np.random.Generator):
    """Shuffles the scans of each class and cuts them into products of 1-4 scans;
    returns ``[(class, [scan index, ...]), ...]``."""
    products: list[tuple[int, list[int]]] = []
    for cls in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        start = 0
        while start < len(idx):
            n = int(rng.integers(1, 5))
            products.append((int(cls), [int(i) for i in idx[start : start + n]]))
            start += n
    return products


def _write_products(out_dir, products, test_products, images, image_size, rng):
    """Renders every product's scans into the train or test folder; returns the
    train rows, the test rows and the training ``(jpeg, category)`` pairs."""
    train_rows, test_rows = [], []
    train_blobs: list[tuple[bytes, str]] = []
    for p, (cls, members) in enumerate(products):
        group = f"p{p:05d}"
        category = f"{cls:02d}"
        for i in members:
            blob = render_digit(images[i], image_size, rng)
            name = hashlib.md5(blob).hexdigest() + ".jpg"
            if p in test_products:
                _write(os.path.join(out_dir, "test", "test", "test", name), blob)
                test_rows.append((name, category, group))
            else:
                _write(
                    os.path.join(out_dir, "train", "train", "train", category, name),
                    blob,
                )
                train_rows.append((name, category, group))
                train_blobs.append((blob, category))
    return train_rows, test_rows, train_blobs


def _add_duplicates(out_dir, test_rows, train_blobs, fraction, rng) -> None:
    """Copies training images into the test set as new products (MD5 hits),
    appending their rows to ``test_rows``."""
    n_dup = int(round(fraction * len(test_rows)))
    for k, j in enumerate(rng.choice(len(train_blobs), size=n_dup, replace=False)):
        blob, category = train_blobs[int(j)]
        name = hashlib.md5(blob).hexdigest() + ".jpg"
        if any(r[0] == name for r in test_rows):
            continue
        _write(os.path.join(out_dir, "test", "test", "test", name), blob)
        test_rows.append((name, category, f"d{k:05d}"))


def _write_tables(out_dir: str, train_rows, test_rows):
    """Writes ``train.csv``, ``test.csv`` and ``test_labels.csv``; returns the train
    and the truth tables."""
    cols = ["filename", "category", "group"]
    train = pd.DataFrame(train_rows, columns=cols)
    truth = pd.DataFrame(test_rows, columns=cols)
    # The real Shopee test.csv has no product column; ours keeps it so product-level
    # averaging can be shown. Readers ignore the placeholder category.
    test = truth[["filename", "group"]].assign(category=TEST_PLACEHOLDER)[cols]
    train.to_csv(os.path.join(out_dir, "train.csv"), index=False)
    test.to_csv(os.path.join(out_dir, "test.csv"), index=False)
    truth.to_csv(os.path.join(out_dir, "test_labels.csv"), index=False)
    return train, truth


def make_digits_dataset(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    test_fraction: float = 0.2,
    duplicate_fraction: float = 0.02,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """Writes the digits as a Shopee-layout competition folder.

    Args:
        out_dir: Folder to create.
        image_size: Side of the square JPEGs.
        test_fraction: Share of products held out as the test set.
        duplicate_fraction: Share of test images that are exact copies of a training
            image (MD5 hits).
        limit: Use only the first ``limit`` scans (for quick tests).
        seed: Seed for products, colours and the split.

    Returns:
        A summary: counts, paths of the CSVs and the image root.
    """
    from sklearn.datasets import load_digits

    out_dir = os.fspath(out_dir)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    images, targets = digits.images, digits.target
    if limit is not None:
        images, targets = images[:limit], targets[:limit]

    products = _products(targets, rng)
    order = rng.permutation(len(products))
    n_test = max(1, int(round(test_fraction * len(products))))
    test_products = set(order[:n_test].tolist())
    train_rows, test_rows, train_blobs = _write_products(
        out_dir, products, test_products, images, image_size, rng
    )
    _add_duplicates(out_dir, test_rows, train_blobs, duplicate_fraction, rng)
    train, truth = _write_tables(out_dir, train_rows, test_rows)
    return {
        "root": out_dir,
        "train_csv": os.path.join(out_dir, "train.csv"),
        "test_csv": os.path.join(out_dir, "test.csv"),
        "test_labels_csv": os.path.join(out_dir, "test_labels.csv"),
        "train_images": os.path.join(out_dir, "train", "train", "train"),
        "test_images": os.path.join(out_dir, "test", "test", "test"),
        "train": len(train),
        "test": len(truth),
        "products": len(products),
        "classes": int(len(np.unique(targets))),
    }
