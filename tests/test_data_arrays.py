"""Arrays and idx files into records: exact pixels back, labels, class names, and
one-line errors for bad input (mismatched lengths, truncated idx files)."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from conftest import photo_crops, stored_records
from PIL import Image

from shopee_tpu.data import write_arrays
from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.write.idx import IdxFormatError, read_idx, read_idx_pair, write_idx

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def _grey(n: int, side: int = 28, seed: int = 0) -> np.ndarray:
    """Real photo crops turned grey: ``n x side x side`` uint8."""
    rgb = photo_crops(n, side, seed=seed).astype(np.float32)
    return (rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)


def _decoded(out_dir, side: int) -> dict[str, np.ndarray]:
    """``{id: pixels}`` as the training pipeline decodes them (3 channels)."""
    from shopee_tpu.data.read.pipeline import load_dataset

    ds = load_dataset(out_dir, training=False, image_size=side, batch_size=16)
    return {
        i.decode(): image
        for images, ids in ds.as_numpy_iterator()
        for image, i in zip(images, ids, strict=True)
    }


def test_idx_round_trip_gzipped_or_not_whatever_the_name(tmp_path):
    images = _grey(6, side=5)
    labels = np.array([3, 0, 9, 1, 1, 7], np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    write_idx(tmp_path / "y-idx1-ubyte", labels)
    assert gzip.decompress((tmp_path / "x-idx3-ubyte.gz").read_bytes())[:4] == (
        b"\x00\x00\x08\x03"
    )
    x, y = read_idx_pair(tmp_path / "x-idx3-ubyte.gz", tmp_path / "y-idx1-ubyte")
    assert x.dtype == np.uint8 and x.shape == (6, 5, 5) and (x == images).all()
    assert y.tolist() == [3, 0, 9, 1, 1, 7]
    # Unpacked but still named .gz, and gzipped without the suffix: both read.
    (tmp_path / "plain.gz").write_bytes((tmp_path / "y-idx1-ubyte").read_bytes())
    (tmp_path / "packed").write_bytes((tmp_path / "x-idx3-ubyte.gz").read_bytes())
    assert (read_idx(tmp_path / "plain.gz") == labels).all()
    assert (read_idx(tmp_path / "packed") == images).all()
    floats = np.linspace(-1, 1, 6).reshape(2, 3)
    write_idx(tmp_path / "f", floats)
    assert read_idx(tmp_path / "f").tolist() == floats.tolist()


def test_truncated_or_foreign_idx_files_are_named_in_one_line(tmp_path):
    write_idx(tmp_path / "images", _grey(4, side=6))
    whole = (tmp_path / "images").read_bytes()
    (tmp_path / "cut").write_bytes(whole[:-10])
    with pytest.raises(IdxFormatError) as e:
        read_idx(tmp_path / "cut")
    assert str(e.value) == (
        f"{tmp_path / 'cut'}: truncated idx file: the header announces 4 x 6 x 6 "
        "uint8 values (144 bytes), the file holds 134 bytes after it"
    )
    (tmp_path / "cut.gz").write_bytes(gzip.compress(whole)[:-30])
    with pytest.raises(IdxFormatError, match=r"cut\.gz: truncated or corrupt gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "long").write_bytes(whole + b"\0")
    with pytest.raises(IdxFormatError, match="too long idx file"):
        read_idx(tmp_path / "long")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(IdxFormatError, match=r"png: not an idx file \(first bytes 89"):
        read_idx(tmp_path / "png")
    write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(IdxFormatError, match="holds 4 images but .*labels 5 labels"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="idx file not found: .*nowhere"):
        read_idx(tmp_path / "nowhere")
    assert "\n" not in str(e.value)


def test_grey_arrays_round_trip_exactly_with_class_names(tmp_path):
    images = _grey(40, side=28)
    labels = np.arange(40) % 5
    m = write_arrays(images, labels, tmp_path / "rec", FASHION, shards=3, workers=2)
    assert m["total"] == 40 and m["num_skipped"] == 0 and m["complete"]
    assert m["label_map"] == {name: i for i, name in enumerate(FASHION)}
    assert m["class_counts"] == {name: 8 for name in FASHION}
    assert m["channels"] == 1 and m["image_formats"] == {"PNG": 40}
    assert m["image_size"] == 28 and len(m["shards"]) == 3
    stored = stored_records(tmp_path / "rec")
    assert sorted(stored, key=int) == [str(i) for i in range(40)]
    for i, (label, data) in stored.items():
        png = Image.open(io.BytesIO(data))
        assert png.format == "PNG" and png.mode == "L" and label == labels[int(i)]
        assert (np.asarray(png) == images[int(i)]).all()
    # The reader expands grey to the three channels a model takes, exactly.
    decoded = _decoded(tmp_path / "rec", 28)
    assert len(decoded) == 40
    for i, pixels in decoded.items():
        assert pixels.shape == (28, 28, 3)
        assert (pixels == images[int(i)][:, :, None]).all()


def test_pngs_of_another_size_are_resized_when_read(tmp_path):
    import tensorflow as tf

    images = _grey(6, side=30)[:, :, 3:27]  # 30 rows x 24 columns
    m = write_arrays(images, [0, 1] * 3, tmp_path / "rec", workers=1)
    assert m["image_size"] is None and m["image_formats"] == {"PNG": 6}
    decoded = _decoded(tmp_path / "rec", 20)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    want = tf.saturate_cast(tf.round(tf.image.resize(rgb, [20, 20])), tf.uint8)
    assert all((decoded[str(i)] == want[i].numpy()).all() for i in range(6))


def test_colour_arrays_with_text_labels_and_keras_shapes(tmp_path):
    images = photo_crops(12, 32, seed=3)
    labels = np.array(["cat", "dog", "bird"] * 4)[:, None]  # N x 1, as keras gives
    m = write_arrays(images, labels, tmp_path / "rec", shards=2, workers=1)
    assert m["label_map"] == {"bird": 0, "cat": 1, "dog": 2}
    assert m["channels"] == 3 and m["image_formats"] == {"PNG": 12}
    decoded = _decoded(tmp_path / "rec", 32)
    assert all((decoded[str(i)] == images[i]).all() for i in range(12))
    stored = stored_records(tmp_path / "rec")
    assert [stored[str(i)][0] for i in range(12)] == [1, 2, 0] * 4
    # Class ids without names keep their numbers, classes no image has included.
    m = write_arrays(images[:3], [0.0, 4.0, 2.0], tmp_path / "ids", workers=1)
    assert m["label_map"] == {str(i): i for i in range(5)} and m["num_classes"] == 5
    # N x H x W x 1 is grey; larger than 64 px is stored as JPEG.
    big = _grey(2, side=80)[..., None]
    m = write_arrays(big, None, tmp_path / "big", workers=1)
    assert m["channels"] == 1 and m["image_formats"] == {"JPEG": 2}


def test_unlabeled_arrays_keep_their_ids(tmp_path):
    images = _grey(5, side=10)
    ids = [f"img{i}.png" for i in range(5)]
    m = write_arrays(images, None, tmp_path / "rec", ids=ids, workers=1)
    assert m["test"] and m["prefix"] == "test" and m["class_counts"] == {"unlabeled": 5}
    assert {i: v[0] for i, v in stored_records(tmp_path / "rec").items()} == {
        i: -1 for i in ids
    }


def test_bad_arrays_get_one_line_naming_the_problem(tmp_path):
    images = _grey(4, side=8)
    names = {"class_names": FASHION}
    cases = [
        (images, [0, 1, 2], {}, "labels: 3 labels for 4 images"),
        (images, [0, 1, 2, 1], {}, None),  # the good one, for contrast
        (images, [0, 1, -2, 1], {}, r"labels: class id -2 at images\[2\] is negative"),
        (images, [0, 1, 5, 1], names, r"class id 5 at images\[2\] has no class name"),
        (images / 255, [0] * 4, {}, "pixels must be uint8 0..255"),
        (images.astype(np.int32) * 2, [0] * 4, {}, r"values \d+..\d+ \(int32\)"),
        (images[..., None].repeat(2, 3), [0] * 4, {}, "2 channels"),
        (images[0], [0] * 8, {}, r"expected N x H x W .* got shape \(8 x 8\)"),
        (images, ["a", "b", "z", "a"], {"class_names": "abc"}, "not in the label"),
        (images, [0, 1, 0, 1], {**names, "label_map": {}}, "not both"),
    ]
    for i, (x, y, kwargs, message) in enumerate(cases):
        out = tmp_path / f"c{i}"
        if message is None:
            assert write_arrays(x, y, out, workers=1, verbose=False)["total"] == 4
            continue
        with pytest.raises(ValueError, match=message) as e:
            write_arrays(x, y, out, workers=1, verbose=False, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="ids: 3 values for 4 images"):
        write_arrays(images, None, tmp_path / "x", ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="'a' is the id of more than one image"):
        write_arrays(images, None, tmp_path / "x", ids=["a", "b", "a", "c"])


def test_other_arrays_in_the_same_folder_are_refused_and_a_rerun_resumes(tmp_path):
    images, labels = _grey(6, side=8), [0, 1, 0, 1, 0, 1]
    first = write_arrays(images, labels, tmp_path / "rec", workers=1)
    again = write_arrays(images, labels, tmp_path / "rec", workers=1)
    assert again["fingerprint"] == first["fingerprint"]
    with pytest.raises(ValueError, match="already holds a different dataset"):
        write_arrays(255 - images, labels, tmp_path / "rec", workers=1)
    m = write_arrays(255 - images, labels, tmp_path / "rec", workers=1, overwrite=True)
    assert m["fingerprint"] != first["fingerprint"] and m["total"] == 6


def test_cli_writes_idx_files_with_class_names_and_names_a_truncated_one(
    tmp_path, capsys
):
    from shopee_tpu.cli import main

    images, labels = _grey(10, side=12), np.array([0, 1, 2, 3, 4] * 2, np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    write_idx(tmp_path / "y-idx1-ubyte.gz", labels)
    (tmp_path / "names.txt").write_text("\n".join(FASHION) + "\n")
    argv = ["tfrecords", "--idx", str(tmp_path / "x-idx3-ubyte.gz"),
            str(tmp_path / "y-idx1-ubyte.gz"), "--class-names",
            str(tmp_path / "names.txt"), "--out", str(tmp_path / "rec"),
            "--workers", "1", "--shards", "2"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 10 records in 2 shards to {tmp_path / 'rec'} (0 skipped, grey, PNG)"
    ]
    m = read_manifest(tmp_path / "rec")
    assert m["label_map"] == {n: i for i, n in enumerate(FASHION)}
    stored = stored_records(tmp_path / "rec")
    assert {i: v[0] for i, v in stored.items()} == {
        str(i): int(labels[i]) for i in range(10)
    }
    # --test writes unlabeled records, whatever the labels file says.
    argv_test = [*argv[:4], "--out", str(tmp_path / "unlabeled"), "--test"]
    assert main(argv_test) == 0
    assert read_manifest(tmp_path / "unlabeled")["class_counts"] == {"unlabeled": 10}
    capsys.readouterr()
    # Class names on the command line, comma-separated; too few of them is an error.
    argv[argv.index("--class-names") + 1] = "a,b"
    argv[argv.index("--out") + 1] = str(tmp_path / "rec2")
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"shopee-tpu tfrecords: error: {tmp_path / 'y-idx1-ubyte.gz'}: class id 2 "
        "at x-idx3-ubyte.gz[2] has no class name (6 rows; the label map has ids 0..1)"
    )
    raw = gzip.decompress((tmp_path / "x-idx3-ubyte.gz").read_bytes())
    (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-100])
    argv[2] = str(tmp_path / "cut-idx3-ubyte")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"shopee-tpu tfrecords: error: {tmp_path / 'cut-idx3-ubyte'}")
    assert err.endswith(
        "truncated idx file: the header announces 10 x 12 x 12 uint8 values "
        "(1440 bytes), the file holds 1340 bytes after it"
    )
