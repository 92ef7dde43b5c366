"""The MD5 duplicate dictionary: build, conflicts, image and product overrides."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from shopee_tpu.inference.ensemble import aggregate_products
from shopee_tpu.inference.md5 import (
    CONFLICT,
    MISSING,
    Md5Dictionary,
    apply_image_overrides,
    apply_product_overrides,
    build_md5_dictionary,
)

# Fake "files": distinct byte strings that start like JPEGs.
FILES = {k: b"\xff\xd8\xff" + k.encode() * 40 for k in "ABCDEX"}
HEX = {k: hashlib.md5(v).hexdigest() for k, v in FILES.items()}

# (image, label, product)
TRAIN = [
    ("A", 1, "p1"),
    ("B", 1, "p1"),
    ("C", 2, "p2"),
    ("A", 1, "p3"),  # repeat of A, same label
    ("D", 0, "p4"),
    ("D", 3, "p5"),  # D under two labels: a conflict
    ("E", 2, ""),  # no product
    ("A", 1, "p6"),  # p6 = {A, B} like p1, same label
    ("B", 1, "p6"),
    ("C", 0, "p7"),  # C under two labels; product {C} too
]


@pytest.fixture(scope="module")
def dictionary():
    items = ((FILES[k], label, g) for k, label, g in TRAIN)  # a one-pass generator
    return build_md5_dictionary(items, label_map={str(i): i for i in range(4)})


def test_build_counts_conflicts(dictionary):
    assert dictionary.stats == {
        "images": 10,
        "distinct_images": 5,
        "image_conflicts": 2,  # C and D
        "products": 7,
        "distinct_products": 4,  # {A,B}, {C}, {A}, {D}
        "product_conflicts": 2,  # {C} (2 vs 0), {D} (0 vs 3)
    }
    found = dictionary.lookup_images([HEX[k] for k in "ABCDEX"])
    assert found.tolist() == [1, 1, CONFLICT, CONFLICT, 2, MISSING]
    assert dictionary.image_keys.dtype.itemsize == 16  # compact binary digests


def test_same_dictionary_from_a_read_ids_labels_frame(dictionary, tmp_path):
    frame = pd.DataFrame(
        {
            "id": [f"{i}.jpg" for i in range(len(TRAIN))],
            "label": [label for _, label, _ in TRAIN],
            "group": [g for _, _, g in TRAIN],
            "md5": [HEX[k] for k, _, _ in TRAIN],
        }
    )
    other = build_md5_dictionary(frame)
    assert other.stats == dictionary.stats
    assert np.array_equal(other.image_keys, dictionary.image_keys)
    assert np.array_equal(other.product_labels, dictionary.product_labels)
    dictionary.save(tmp_path / "md5.npz")
    loaded = Md5Dictionary.load(tmp_path / "md5.npz")
    assert loaded.stats == dictionary.stats and loaded.label_map["3"] == 3
    assert np.array_equal(loaded.image_keys, dictionary.image_keys)
    assert np.array_equal(loaded.image_labels, dictionary.image_labels)
    assert np.array_equal(loaded.product_keys, dictionary.product_keys)


def test_image_overrides(dictionary):
    md5s = [HEX[k] for k in "ADXEC"]
    probs = np.full((5, 4), 0.25, np.float32)
    probs[3] = [0.7, 0.1, 0.1, 0.1]  # E predicted 0, dictionary says 2
    out, stats = apply_image_overrides(probs, md5s, dictionary)
    assert stats == {"images": 5, "hits": 2, "conflicts": 2, "changed": 2}
    np.testing.assert_array_equal(out[0], [0, 1, 0, 0])
    np.testing.assert_array_equal(out[3], [0, 0, 1, 0])
    np.testing.assert_array_equal(out[[1, 2, 4]], probs[[1, 2, 4]])  # conflict/miss
    with pytest.raises(ValueError, match="outside the 2 classes"):
        apply_image_overrides(probs[:, :2], md5s, dictionary)


def test_product_overwrite(dictionary):
    # test images: q1 = {A, B, A} (order and repeats do not matter), q2 = {A},
    # q3 = {A, E} (unknown set), q4 = {D} (conflicting product)
    images = [("q1", "B"), ("q2", "A"), ("q1", "A"), ("q3", "A"), ("q1", "A")]
    images += [("q3", "E"), ("q4", "D")]
    groups = [g for g, _ in images]
    md5s = [HEX[k] for _, k in images]
    probs = np.tile(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32), (len(images), 1))
    keys, product_probs = aggregate_products(groups, probs, "mean")
    out, stats = apply_product_overrides(keys, product_probs, groups, md5s, dictionary)
    assert keys.tolist() == ["q1", "q2", "q3", "q4"]
    assert stats == {"products": 4, "hits": 2, "conflicts": 1, "changed": 2}
    np.testing.assert_array_equal(out[0], [0, 1, 0, 0])
    np.testing.assert_array_equal(out[1], [0, 1, 0, 0])
    np.testing.assert_allclose(out[2:], product_probs[2:])


def test_bad_items_are_named():
    with pytest.raises(ValueError, match="item 1: label -1"):
        build_md5_dictionary([(HEX["A"], 0, ""), (HEX["B"], -1, "")])
    with pytest.raises(ValueError, match="item 0: md5 'xyz' is not 32 hex"):
        build_md5_dictionary([("xyz", 0, "")])
    with pytest.raises(ValueError, match="need columns md5,label"):
        build_md5_dictionary(pd.DataFrame({"id": ["a"], "label": [0]}))
