import os

import pandas as pd

from shopee_tpu.data.samples.digits import TEST_PLACEHOLDER


def test_digits_layout(digits_dir):
    train = pd.read_csv(digits_dir["train_csv"], dtype=str)
    test = pd.read_csv(digits_dir["test_csv"], dtype=str)
    truth = pd.read_csv(digits_dir["test_labels_csv"], dtype=str)
    assert list(train.columns) == ["filename", "category", "group"]
    assert list(test.columns) == ["filename", "category", "group"]
    assert (test.category == TEST_PLACEHOLDER).all()
    assert train.category.str.fullmatch(r"\d\d").all()
    assert len(train) + len(truth) >= 300
    # No product is on both sides.
    assert not set(train.group) & set(truth.group)
    # Products hold 1-4 images of one category.
    sizes = train.groupby("group").category.agg(["size", "nunique"])
    assert sizes["size"].between(1, 4).all() and (sizes["nunique"] == 1).all()
    assert sizes["size"].max() > 1
    for row in train.head(20).itertuples():
        assert os.path.exists(
            os.path.join(digits_dir["train_images"], row.category, row.filename)
        )
