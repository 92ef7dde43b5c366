"""Pixel CSVs (Kaggle's Fashion-MNIST and Digit Recognizer layout) into records:
shapes, labels, ids, exact pixels, and a bad row named by its line number."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from conftest import photo_crops, stored_records
from PIL import Image

from shopee_tpu.cli import main
from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.write.pixels_csv import (
    parse_shape,
    read_pixels_csv,
    write_pixels_csv,
)


def _grey(n: int, side: int, seed: int = 0) -> np.ndarray:
    return photo_crops(n, side, seed=seed)[..., 1]


def _pixel_csv(path, images, labels=None, ids=None, first=1) -> None:
    """Writes Kaggle's layout: ``[id,][label,]pixel1..pixelN``."""
    flat = images.reshape(len(images), -1)
    frame = pd.DataFrame(
        flat, columns=[f"pixel{first + i}" for i in range(flat.shape[1])]
    )
    if labels is not None:
        frame.insert(0, "label", labels)
    if ids is not None:
        frame.insert(0, "ImageId", ids)
    frame.to_csv(path, index=False)


def _stored(out_dir) -> dict[str, tuple[int, np.ndarray]]:
    """``{id: (label, decoded pixels)}`` of every record."""
    return {
        i: (label, np.asarray(Image.open(io.BytesIO(data))))
        for i, (label, data) in stored_records(out_dir).items()
    }


def test_fashion_layout_round_trips_exactly(tmp_path):
    images, labels = _grey(30, 28), np.arange(30) % 10
    _pixel_csv(tmp_path / "train.csv", images, labels)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
             "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
    m = write_pixels_csv(
        tmp_path / "train.csv", tmp_path / "rec", class_names=names, workers=2
    )
    assert m["total"] == 30 and m["num_skipped"] == 0 and m["channels"] == 1
    assert m["label_map"] == {n: i for i, n in enumerate(names)}
    assert m["class_counts"] == {n: 3 for n in names}
    stored = _stored(tmp_path / "rec")
    assert sorted(stored, key=int) == [str(i) for i in range(1, 31)]  # row numbers
    for i, (label, pixels) in stored.items():
        assert label == labels[int(i) - 1] and (pixels == images[int(i) - 1]).all()


def test_test_csv_without_labels_with_ids_and_a_given_shape(tmp_path):
    images = photo_crops(4, 6, seed=2)[:, :, :5]  # 6 x 5 x 3 colour
    _pixel_csv(tmp_path / "test.csv", images, ids=[10, 11, 12, 13], first=0)
    with pytest.raises(ValueError, match="90 pixel columns are not a square count"):
        read_pixels_csv(tmp_path / "test.csv")
    table = read_pixels_csv(tmp_path / "test.csv", shape="6x5x3")
    assert table.labels is None and table.ids == ["10", "11", "12", "13"]
    assert (table.images == images).all()
    m = write_pixels_csv(tmp_path / "test.csv", tmp_path / "rec", shape=(6, 5, 3))
    assert m["test"] and m["channels"] == 3 and m["image_size"] is None
    stored = _stored(tmp_path / "rec")
    assert {i: v[0] for i, v in stored.items()} == {str(i): -1 for i in range(10, 14)}
    assert all((stored[str(10 + k)][1] == images[k]).all() for k in range(4))
    # A labelled CSV written as a test set drops the labels.
    _pixel_csv(tmp_path / "l.csv", images[..., 0], labels=[1, 2, 3, 4])
    assert read_pixels_csv(tmp_path / "l.csv", shape="6x5", test=True).labels is None


def test_bad_rows_are_skipped_and_named_by_line(tmp_path, capsys):
    images, labels = _grey(8, 3), ["0", "1", "2", "0", "1", "2", "0", "1"]
    _pixel_csv(tmp_path / "train.csv", images, labels)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad = {
        3: ("pixel4", "dark"),  # line 3 is the second image
        5: ("pixel1", "300"),
        6: ("pixel9", "2.5"),
        8: ("pixel2", ""),
        9: ("label", ""),
    }
    for line, (column, value) in bad.items():
        fields = lines[line - 1].split(",")
        fields[header.index(column)] = value
        lines[line - 1] = ",".join(fields)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    argv = ["tfrecords", "--pixels-csv", str(tmp_path / "train.csv"), "--out",
            str(tmp_path / "rec"), "--workers", "1", "--shards", "2"]  # fmt: skip
    assert main(argv) == 0
    m = read_manifest(tmp_path / "rec")
    assert m["total"] == 3 and m["num_skipped"] == 5
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {
        "train.csv line 3": "pixel4 = dark is not a number",
        "train.csv line 5": "pixel1 = 300 is outside 0..255",
        "train.csv line 6": "pixel9 = 2.5 is not a whole number",
        "train.csv line 8": "pixel2 is empty",
        "train.csv line 9": "label is empty",
    }
    assert sorted(_stored(tmp_path / "rec")) == ["1", "3", "6"]
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == f"wrote 3 records in 2 shards to {tmp_path / 'rec'} (5 skipped, grey, PNG)"
    )
    assert "skipped train.csv line 3: pixel4 = dark is not a number" in out


def test_structural_problems_stop_with_one_line(tmp_path):
    images = _grey(3, 4)
    _pixel_csv(tmp_path / "a.csv", images, [0, 1, 0])
    text = (tmp_path / "a.csv").read_text().splitlines()
    text[2] += ",7"  # line 3: one field too many
    (tmp_path / "b.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(
        ValueError, match=r"b\.csv: line 3 has 18 fields, the header has 17"
    ):
        read_pixels_csv(tmp_path / "b.csv")
    with pytest.raises(
        ValueError, match="shape 5x5 needs 25 pixel columns, the file has 16"
    ):
        read_pixels_csv(tmp_path / "a.csv", shape="5x5")
    (tmp_path / "c.csv").write_text("\n".join(text[1:]) + "\n")  # no header
    with pytest.raises(ValueError, match="first line holds numbers, not column names"):
        read_pixels_csv(tmp_path / "c.csv")
    _pixel_csv(tmp_path / "d.csv", images, ids=["x", "y", "x"])
    with pytest.raises(ValueError, match="id 'x' on line 2 and line 4"):
        read_pixels_csv(tmp_path / "d.csv")
    with pytest.raises(
        ValueError, match="class id 1 at a.csv line 3 has no class name"
    ):
        write_pixels_csv(tmp_path / "a.csv", tmp_path / "r", class_names=["shirt"])
    for shape in ("28", "28x28x2", "axb"):
        with pytest.raises(ValueError, match="give rows x columns"):
            parse_shape(shape)
