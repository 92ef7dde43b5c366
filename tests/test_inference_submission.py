"""Submission writers round-trip through the validators; problems are named."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from shopee_tpu.inference.submission import (
    FORMATS,
    SubmissionError,
    resolve_format,
    validate_cdiscount_submission,
    validate_named_submission,
    validate_shopee_submission,
    write_cdiscount_submission,
    write_image_submission,
    write_named_submission,
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


NAMES = {"Ankle boot": 0, "Shirt, long": 1, "bag": 2}  # a comma needs quoting


def test_named_round_trip_with_probabilities(tmp_path, test_csv):
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.0, 0.125, 0.875]])
    out = tmp_path / "named.csv"
    df = write_named_submission(
        out, TEST_IDS, probs, NAMES, probability=True, expected=test_csv
    )
    assert open(out).read() == (
        "filename,category,probability\n"
        'a1.jpg,"Shirt, long",0.7\nb2.jpg,Ankle boot,0.5\nc3.jpg,bag,0.875\n'
    )
    back = validate_named_submission(out, test_csv, NAMES)
    assert back["category"].tolist() == df["category"].tolist()
    write_named_submission(out, TEST_IDS, np.array([2, 2, 0]), NAMES)
    assert open(out).read() == (
        "filename,category\na1.jpg,bag\nb2.jpg,bag\nc3.jpg,Ankle boot\n"
    )


def test_named_validator_names_each_problem(tmp_path, test_csv):
    path = tmp_path / "bad.csv"
    path.write_text(
        "filename,category,probability\n"
        "a1.jpg,bag,0.9\nb2.jpg,Sock,0.4\nc3.jpg,bag,1.5\nd4.jpg, ,x\n"
    )
    with pytest.raises(SubmissionError) as err:
        validate_named_submission(path, test_csv, NAMES)
    assert err.value.problems == [
        "bad category format (1, expected /.*\\S.*/): 'd4.jpg= '",
        "category not in the label map (1): 'b2.jpg=Sock'",
        "probability not a number in 0..1 (2): 'c3.jpg=1.5', 'd4.jpg=x'",
        "extra ids (1): 'd4.jpg'",
    ]
    path.write_text("filename,label\na1.jpg,bag\n")
    with pytest.raises(SubmissionError, match="header must be filename,category or "):
        validate_named_submission(path)


def test_auto_picks_shopee_for_numbers_and_named_for_names(tmp_path):
    assert resolve_format("auto", SHOPEE_MAP).name == "shopee"
    assert resolve_format("auto", {"03": 0, "41": 1}).name == "shopee"
    assert resolve_format("auto", NAMES).name == "named"
    assert resolve_format("auto", {"100": 0, "7": 1}).name == "named"  # 3 digits
    assert resolve_format("auto", SHOPEE_MAP, probability=True).name == "named"
    assert [f for f in FORMATS] == ["shopee", "named", "cdiscount"]
    with pytest.raises(ValueError, match="shopee format takes classes that are numb"):
        resolve_format("shopee", NAMES)
    with pytest.raises(ValueError, match="probability column comes with the named"):
        resolve_format("shopee", SHOPEE_MAP, probability=True)
    with pytest.raises(ValueError, match="one of auto, shopee, named, cdiscount"):
        resolve_format("kaggle", NAMES)
    out = tmp_path / "auto.csv"
    write_image_submission(out, TEST_IDS, np.array([0, 1, 2]), NAMES)
    assert open(out).read().splitlines()[1] == "a1.jpg,Ankle boot"
    write_image_submission(out, TEST_IDS, np.array([0, 1, 2]), SHOPEE_MAP)
    assert open(out).read().splitlines()[1] == "a1.jpg,00"
    with pytest.raises(ValueError, match="Shopee category 'bag' is not a number; "):
        write_shopee_submission(out, TEST_IDS, np.array([2, 2, 2]), NAMES)
