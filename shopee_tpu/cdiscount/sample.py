"""A small Cdiscount competition folder in the real format, made offline.

``make_cdiscount_sample`` writes what the Kaggle download holds — ``train.bson``,
``test.bson``, ``category_names.csv`` and ``sample_submission.csv`` — with
``bson.encode`` (pymongo) and real JPEG bytes: scikit-learn's bundled digit scans,
each rendered as a tinted RGB JPEG (180 px by default, like Cdiscount's). Each digit
is one category with a 10-digit ``category_id``; each product holds 1-4 different
scans of its digit. As in the real data, a share of images are byte-identical copies
(some carrying another category: conflicts), and some test images and whole test
products repeat training ones, so deduplication and the MD5 dictionary have work to
do. ``test_truth.csv`` holds the test answers for scoring a submission.

Tests, benchmarks and the Cdiscount notebook use it::

    info = make_cdiscount_sample("data/cdiscount", products=400, image_size=64)
    prepare_cdiscount(info["train"], "rec", category_names=info["category_names"])
"""

from __future__ import annotations

import os

import numpy as np

from shopee_tpu import fs
from shopee_tpu.cdiscount.bson_reader import require_bson

__all__ = ["make_cdiscount_sample", "SAMPLE_CATEGORY_IDS"]

# Ten 10-digit ids in the style of Cdiscount's (two are real ones).
SAMPLE_CATEGORY_IDS = (
    1000010653, 1000004079, 1000015539, 1000018290, 1000021794,
    1000004141, 1000005744, 1000010667, 1000012764, 1000014287,
)  # fmt: skip
_NAMES = (
    "ZERO",
    "UN",
    "DEUX",
    "TROIS",
    "QUATRE",
    "CINQ",
    "SIX",
    "SEPT",
    "HUIT",
    "NEUF",
)
# Listed in category_names.csv but never sold: real files name categories the
# training data may lack.
_UNUSED_CATEGORY_IDS = (1000000271, 1000000282)


def make_cdiscount_sample(
    out_dir: str | os.PathLike,
    *,
    products: int = 300,
    test_products: int | None = None,
    image_size: int = 180,
    duplicate_fraction: float = 0.1,
    conflict_fraction: float = 0.01,
    seed: int = 0,
) -> dict:
    """Writes a Cdiscount-format competition folder.

    Args:
        out_dir: Folder to create.
        products: Training products (1-4 images each, about 2.5 on average).
        test_products: Test products (default: a quarter of ``products``, at
            least 1).
        image_size: Side of the square JPEGs.
        duplicate_fraction: Share of images that are byte copies of an earlier
            image of the same category (training), or of a training image (test).
        conflict_fraction: Share of training images copied from another category.
        seed: Seed of everything.

    Returns:
        Paths (``train``, ``test``, ``category_names``, ``sample_submission``,
        ``test_truth``) and counts.
    """
    bson = require_bson()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    test_products = max(1, products // 4) if test_products is None else test_products
    image, pool, counts = _picture_source(
        rng, image_size, duplicate_fraction, conflict_fraction
    )
    train_docs, product_pool = _train_products(products, rng, image, pool)
    test_docs, truth = _test_products(
        test_products, rng, image, product_pool, train_docs, duplicate_fraction, counts
    )
    paths = _write_folder(out_dir, bson, train_docs, test_docs, truth)
    return {
        **paths,
        "train_products": len(train_docs),
        "test_products": len(test_docs),
        "train_images": sum(len(d["imgs"]) for d in train_docs),
        "test_images": sum(len(d["imgs"]) for d in test_docs),
        "categories": 10,
        **counts,
    }


def _picture_source(rng, image_size, duplicate_fraction, conflict_fraction):
    """``(image, pool, counts)``: ``image(cls, train)`` makes a JPEG of digit ``cls``,
    a new rendering or a copy of an earlier training image; ``pool`` holds the
    training images by class (the caller adds them), ``counts`` the copies made."""
    from sklearn.datasets import load_digits

    from shopee_tpu.data.samples.digits import render_digit

    digits = load_digits()
    by_class = [np.flatnonzero(digits.target == c) for c in range(10)]
    counts = {
        "duplicates": 0,
        "conflicts": 0,
        "test_copies": 0,
        "test_product_copies": 0,
    }
    pool: list[list[bytes]] = [[] for _ in range(10)]  # training images by class

    def image(cls: int, train: bool) -> bytes:
        """A new rendering, or a copy of an earlier training image."""
        r = rng.random()
        if r < duplicate_fraction and pool[cls]:
            counts["duplicates" if train else "test_copies"] += 1
            return pool[cls][int(rng.integers(len(pool[cls])))]
        others = [c for c in range(10) if c != cls and pool[c]]
        if train and r < duplicate_fraction + conflict_fraction and others:
            counts["conflicts"] += 1
            source = pool[others[int(rng.integers(len(others)))]]
            return source[int(rng.integers(len(source)))]
        scan = digits.images[by_class[cls][int(rng.integers(len(by_class[cls])))]]
        return render_digit(scan, image_size, rng)

    return image, pool, counts


def _train_products(products, rng, image, pool):
    """The training documents (1-4 images each) and each product's pictures."""
    train_docs, product_pool = [], []
    next_id = 0
    for _ in range(products):
        cls = int(rng.integers(10))
        pictures = [image(cls, True) for _ in range(int(rng.integers(1, 5)))]
        for p in pictures:
            pool[cls].append(p)
        product_pool.append(pictures)
        train_docs.append(
            {
                "_id": next_id,
                "category_id": SAMPLE_CATEGORY_IDS[cls],
                "imgs": [{"picture": p} for p in pictures],
            }
        )
        next_id += int(rng.integers(1, 4))  # real ids have gaps
    return train_docs, product_pool


def _test_products(
    test_products, rng, image, product_pool, train_docs, duplicate_fraction, counts
):
    """The test documents (no ``category_id``) and ``(_id, category_id)`` answers."""
    test_docs, truth = [], []
    test_id = 10
    for _ in range(test_products):
        cls = int(rng.integers(10))
        if rng.random() < duplicate_fraction / 2 and product_pool:
            # A whole training product sold again: a product-level MD5 hit.
            j = int(rng.integers(len(product_pool)))
            counts["test_product_copies"] += 1
            pictures = list(product_pool[j])
            cls = SAMPLE_CATEGORY_IDS.index(train_docs[j]["category_id"])
        else:
            pictures = [image(cls, False) for _ in range(int(rng.integers(1, 5)))]
        test_docs.append({"_id": test_id, "imgs": [{"picture": p} for p in pictures]})
        truth.append((test_id, SAMPLE_CATEGORY_IDS[cls]))
        test_id += int(rng.integers(1, 5))
    return test_docs, truth


def _write_folder(out_dir, bson, train_docs, test_docs, truth) -> dict:
    """Writes the BSON files and the CSVs; returns their paths."""
    import pandas as pd

    paths = {
        "train": os.path.join(out_dir, "train.bson"),
        "test": os.path.join(out_dir, "test.bson"),
        "category_names": os.path.join(out_dir, "category_names.csv"),
        "sample_submission": os.path.join(out_dir, "sample_submission.csv"),
        "test_truth": os.path.join(out_dir, "test_truth.csv"),
    }
    for key, docs in (("train", train_docs), ("test", test_docs)):
        with fs.atomic_path(paths[key]) as tmp, open(tmp, "wb") as f:
            for doc in docs:
                f.write(bson.encode(doc))
    names = pd.DataFrame(
        {
            "category_id": list(SAMPLE_CATEGORY_IDS) + list(_UNUSED_CATEGORY_IDS),
            "category_level1": "CHIFFRES",
            "category_level2": "CHIFFRES MANUSCRITS",
            "category_level3": [f"CHIFFRE {n}" for n in _NAMES]
            + ["INUTILISE A", "INUTILISE B"],
        }
    )
    names.to_csv(paths["category_names"], index=False)
    ids = [t[0] for t in truth]
    pd.DataFrame({"_id": ids, "category_id": SAMPLE_CATEGORY_IDS[0]}).to_csv(
        paths["sample_submission"], index=False
    )
    pd.DataFrame(truth, columns=["_id", "category_id"]).to_csv(
        paths["test_truth"], index=False
    )
    return paths
