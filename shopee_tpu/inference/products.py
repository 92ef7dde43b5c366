"""One row per product (the ``cdiscount`` format): the one path from image
predictions to a product submission, for ``predict_run`` and ``stack``.

The images of a product (its ``group``; an image without one is its own product)
are aggregated (``ensemble.aggregate_products``), known products may be overridden
from the MD5 dictionary, and when the test records list their products
(``products.csv``, written by ``cdiscount prepare-test``) every listed product gets
a row, those without a usable image included, and is expected in the submission.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.data.manifests import manifest_beside
from shopee_tpu.inference import md5 as md5_lib
from shopee_tpu.inference.ensemble import aggregate_products
from shopee_tpu.inference.submission import write_cdiscount_submission

__all__ = ["write_product_submission", "declared_products"]


def write_product_submission(
    out,
    ids: Sequence[str],
    groups: Sequence[str],
    probs,
    label_map: Mapping,
    files: Sequence[str],
    *,
    product_reduce: str = "sum",
    expected=None,
    dictionary: md5_lib.Md5Dictionary | None = None,
    md5s: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Validates and writes ``_id,category_id`` from the predictions of images.

    Args:
        out: Submission CSV (``None``: validate only).
        ids, groups: Each image's id and product (``""``: none).
        probs: ``[images, classes]``.
        label_map: ``{category: class_id}``.
        files: The test records, whose manifest may list every product.
        product_reduce: ``sum``, ``mean`` or ``geometric``.
        expected: Product ids that must each appear once (default: the listed
            products, if any).
        dictionary, md5s: The MD5 dictionary and each image's MD5: known
            products are overridden.

    Returns:
        ``(submission, summary)``; the summary counts the MD5 product hits, the
        products without images and the products.
    """
    summary = {}
    groups = [g or i for g, i in zip(groups, ids, strict=True)]
    keys, product_probs = aggregate_products(groups, probs, product_reduce)
    if dictionary is not None:
        product_probs, summary["md5_products"] = md5_lib.apply_product_overrides(
            keys, product_probs, groups, md5s, dictionary
        )
    products = declared_products(files)
    if products is not None:
        keys, product_probs, summary["products_without_images"] = _all_products(
            products, keys, product_probs
        )
        expected = products if expected is None else expected
    summary["products"] = len(keys)
    df = write_cdiscount_submission(
        out, keys, product_probs, label_map, expected=expected
    )
    return df, summary


def declared_products(files: Sequence[str]) -> list[str] | None:
    """Every product id of test records that list them (``products.csv``)."""
    name = manifest_beside(files[0]).get("products")
    if not name:
        return None
    folder = files[0].rsplit("/", 1)[0] if "/" in files[0] else "."
    path = fs.join(folder, name)
    if not fs.exists(path):
        raise FileNotFoundError(f"{path}: listed in {folder}/manifest.json but missing")
    return pd.read_csv(path, dtype={"_id": str})["_id"].tolist()


def _all_products(products: list[str], keys, product_probs):
    """Rows for every listed product, in the list's order. A product without a usable
    image gets the mean prediction of all products (the test set's likeliest class)."""
    row = {str(k): i for i, k in enumerate(np.asarray(keys).tolist())}
    listed = set(products)
    unknown = [k for k in row if k not in listed]
    if unknown:
        raise ValueError(
            f"test records hold products not in products.csv: {unknown[:5]}"
        )
    prior = np.asarray(product_probs).mean(axis=0, keepdims=True)
    table = np.concatenate([np.asarray(product_probs), prior])
    picks = [row.get(p, len(table) - 1) for p in products]
    n_missing = sum(p not in row for p in products)
    return np.asarray(products), table[picks], n_missing
