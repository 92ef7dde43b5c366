"""Submission writers round-trip through the validators; problems are named."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from shopee_tpu.inference.submission import (
    SubmissionError,
    validate_cdiscount_submission,
    validate_shopee_submission,
    write_cdiscount_submission,
    write_shopee_submission,
)

SHOPEE_MAP = {str(c): c for c in range(12)}  # Shopee categories 0..11 = class ids
TEST_IDS = ["a1.jpg", "b2.jpg", "c3.jpg"]


@pytest.fixture
def test_csv(tmp_path):
    path = tmp_path / "test.csv"
    pd.DataFrame({"filename": TEST_IDS, "category": ["43"] * 3}).to_csv(
        path, index=False
    )
    return path


def test_shopee_round_trip(tmp_path, test_csv):
    probs = np.eye(12, dtype=np.float32)[[3, 11, 0]]
    out = tmp_path / "submission.csv"
    df = write_shopee_submission(out, TEST_IDS, probs, SHOPEE_MAP, expected=test_csv)
    assert open(out).read() == "filename,category\na1.jpg,03\nb2.jpg,11\nc3.jpg,00\n"
    back = validate_shopee_submission(out, test_csv, SHOPEE_MAP)
    assert back.equals(df)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_cdiscount_round_trip_maps_class_ids_back(tmp_path):
    label_map = {"1000010653": 0, "1000010667": 1, "1000004079": 2}
    out = tmp_path / "sub.csv"
    write_cdiscount_submission(
        out, [10, 14, 21], np.array([2, 0, 1]), label_map, expected=["10", "14", "21"]
    )
    assert open(out).read() == (
        "_id,category_id\n10,1000004079\n14,1000010653\n21,1000010667\n"
    )
    validate_cdiscount_submission(out, ["10", "14", "21"], label_map)


def _shopee_csv(tmp_path, rows, header="filename,category"):
    path = tmp_path / "bad.csv"
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def test_missing_and_duplicate_ids_are_named(tmp_path, test_csv):
    path = _shopee_csv(tmp_path, [("a1.jpg", "03"), ("a1.jpg", "04"), ("b2.jpg", "01")])
    with pytest.raises(SubmissionError) as err:
        validate_shopee_submission(path, test_csv)
    message = str(err.value)
    assert "missing ids (1): 'c3.jpg'" in message
    assert "duplicate ids (1): 'a1.jpg x2'" in message
    assert len(err.value.problems) == 2


def test_extra_ids_bad_format_unknown_category_and_header(tmp_path, test_csv):
    rows = [("a1.jpg", "3"), ("b2.jpg", "41"), ("c3.jpg", "01"), ("zz.jpg", "02")]
    with pytest.raises(SubmissionError) as err:
        validate_shopee_submission(_shopee_csv(tmp_path, rows), test_csv, SHOPEE_MAP)
    message = str(err.value)
    assert "extra ids (1): 'zz.jpg'" in message
    assert "bad category format (1, expected /\\d{2}/): 'a1.jpg=3'" in message
    assert "category not in the label map (1): 'b2.jpg=41'" in message
    with pytest.raises(SubmissionError, match="header must be filename,category"):
        validate_shopee_submission(_shopee_csv(tmp_path, [], "id,label"), test_csv)


def test_writer_refuses_bad_submissions_and_leaves_no_file(tmp_path, test_csv):
    out = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError, match="missing ids \\(1\\): 'c3.jpg'"):
        write_shopee_submission(
            out, TEST_IDS[:2], np.array([1, 2]), SHOPEE_MAP, expected=test_csv
        )
    with pytest.raises(ValueError, match=r"class ids \[12\] are not in the label map"):
        write_shopee_submission(out, TEST_IDS, np.array([1, 2, 12]), SHOPEE_MAP)
    assert not out.exists()
    label_map = {"1000010653": 0}
    with pytest.raises(SubmissionError, match="category_id not in the label map"):
        validate_cdiscount_submission(
            pd.DataFrame({"_id": ["1"], "category_id": ["999"]}), ["1"], label_map
        )
