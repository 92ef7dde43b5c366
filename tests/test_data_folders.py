"""A folder per class (and a folder of test images) into records: classes, ids,
hidden files, files that are not images, and a corrupt image named in one line."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import photo_crops, stored_records
from PIL import Image

from shopee_tpu.cli import main
from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.write.folders import scan_folders, write_records_from_folders

TRUNCATED = "corrupt or truncated image (OSError: image file is truncated"


def _save(path, pixels, fmt="JPEG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _ids_labels(out_dir) -> dict[str, int]:
    return {i: label for i, (label, _) in stored_records(out_dir).items()}


@pytest.fixture
def tree(tmp_path):
    """``train/<class>/`` of real photo crops (one nested folder, a corrupt image,
    hidden files, a text file, an empty class) and a flat ``test/`` folder."""
    crops = photo_crops(12, 40, seed=1)
    root = tmp_path / "train"
    files = {
        "shirt/a.jpg": crops[0],
        "shirt/b.jpg": crops[1],
        "shirt/c.png": crops[2],
        "trouser/a.jpg": crops[3],  # the same file name in another class
        "trouser/side/d.jpg": crops[4],  # nested: still a trouser
        "bag/e.JPG": crops[5],
    }
    for rel, pixels in files.items():
        _save(root / rel, pixels, "PNG" if rel.endswith(".png") else "JPEG")
    whole = (root / "shirt" / "a.jpg").read_bytes()
    (root / "bag" / "broken.jpg").write_bytes(whole[: len(whole) * 4 // 5])
    (root / "shirt" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _save(root / ".ipynb_checkpoints" / "x.jpg", crops[6])
    _save(root / "__MACOSX" / "shirt" / "._a.jpg", crops[7])
    (root / "trouser" / "notes.txt").write_text("taken in 2020\n")
    (root / "shoe").mkdir()
    for i in range(3):
        _save(tmp_path / "test" / f"t{i}.png", crops[8 + i][:, :, 0], "PNG")
    (tmp_path / "test" / ".hidden.png").write_bytes(b"not read")
    return tmp_path


def test_class_folders_become_classes_and_the_bad_image_is_listed(tree, capsys):
    m = write_records_from_folders(tree / "train", tree / "rec", shards=2, workers=2)
    assert m["label_map"] == {"bag": 0, "shirt": 1, "shoe": 2, "trouser": 3}
    assert m["num_classes"] == 4 and m["total"] == 6
    assert m["class_counts"] == {"bag": 1, "shirt": 3, "trouser": 2}
    assert [s["path"] for s in m["skipped"]] == [
        str(tree / "train" / "bag" / "broken.jpg")
    ]
    assert m["skipped"][0]["reason"].startswith(TRUNCATED)
    assert _ids_labels(tree / "rec") == {
        "bag/e.JPG": 0,
        "shirt/a.jpg": 1,
        "shirt/b.jpg": 1,
        "shirt/c.png": 1,
        "trouser/a.jpg": 3,
        "trouser/side/d.jpg": 3,
    }
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{tree / 'train'}: 1 file without an image suffix not written (e.g. "
        "trouser/notes.txt)",
        f"{tree / 'train'}: class folders without images: shoe",
    ]


def test_a_flat_folder_is_a_test_set_named_by_file(tree):
    m = write_records_from_folders(tree / "test", tree / "rec", workers=1)
    assert m["test"] and m["total"] == 3 and m["channels"] == 1
    assert m["image_formats"] == {"PNG": 3}
    assert _ids_labels(tree / "rec") == {"t0.png": -1, "t1.png": -1, "t2.png": -1}
    # Asked for a test set, a class tree gives every image, ids below the folder.
    scan = scan_folders(tree / "train", test=True)
    assert scan.test and "trouser/side/d.jpg" in scan.table["id"].tolist()
    assert len(scan.table) == 7  # broken.jpg is an image file; the writer skips it


def test_folder_mistakes_get_one_line(tree):
    _save(tree / "train" / "loose.jpg", photo_crops(1, 20)[0])
    with pytest.raises(ValueError, match=r"1 image beside the class folders \(e.g. "):
        scan_folders(tree / "train")
    with pytest.raises(ValueError, match="no class folders"):
        scan_folders(tree / "test", test=False)
    (tree / "none").mkdir()
    (tree / "none" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"none: no images \(\.jpg"):
        scan_folders(tree / "none")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        scan_folders(tree / "nowhere")


def test_cli_writes_folders_and_names_the_skipped_image(tree, capsys):
    assert main(["tfrecords", "--folders", str(tree / "train"), "--out",
                 str(tree / "rec"), "--workers", "1", "--image-size", "24"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == (
        f"wrote 6 records in 6 shards to {tree / 'rec'} (1 skipped, colour, PNG)"
    )
    assert lines[-1].startswith(
        f"skipped {tree / 'train' / 'bag' / 'broken.jpg'}: {TRUNCATED}"
    )
    # Stored at 24 px: PNG, exactly what Pillow's resize made.
    assert read_manifest(tree / "rec")["image_size"] == 24
    _, png = stored_records(tree / "rec")["shirt/c.png"]
    with Image.open(tree / "train" / "shirt" / "c.png") as original:
        want = np.asarray(original.resize((24, 24), Image.BICUBIC, reducing_gap=3.0))
    assert png.startswith(b"\x89PNG")
    assert (np.asarray(Image.open(io.BytesIO(png))) == want).all()
