"""Fast parts of export and prediction on files: the quantization table, the
host (numpy) TTA views against the Keras ones, listing and reading image files,
the comparison figures and the writers. The trained end to end is test_export.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shopee_tpu.cli import main
from shopee_tpu.data.write.images import BadImage
from shopee_tpu.deploy.check import compare_predictions
from shopee_tpu.inference.exported import check_format, read_contract
from shopee_tpu.inference.files import (
    FilePredictions,
    list_images,
    read_image,
    write_predictions,
)
from shopee_tpu.inference.tta_views import (
    ViewPlan,
    host_view_function,
    view_function,
)


@pytest.mark.parametrize(
    "format,quantize", [("onnx", "int8"), ("saved_model", "float16"), ("onnx", "x")]
)
def test_formats_refuse_a_quantization_they_do_not_take_in_one_line(format, quantize):
    with pytest.raises(ValueError) as e:
        check_format(format, quantize)
    message = str(e.value)
    assert "\n" not in message and f"not for {format}" in message
    assert "litert takes float16 or int8" in message
    check_format("litert", "int8")  # and take what they take
    check_format(format, None)


def test_export_cli_refuses_before_reading_the_run(tmp_path, capsys):
    code = main(
        ["export", "--run", str(tmp_path / "nowhere"), "--format", "onnx",
         "--quantize", "int8", "--out", str(tmp_path / "x")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "not for onnx" in err[0]
    assert not (tmp_path / "x").exists()


def test_host_views_equal_the_keras_views():
    from keras import ops

    views = "identity,flip_lr,flip_ud,rot90,rot180,rot270,transpose,shift_2,"
    views += "zoom_90,flip_lr+zoom_75,shift_up_3"
    x = np.random.default_rng(0).uniform(0, 255, (2, 12, 12, 3)).astype("float32")
    plan = ViewPlan.parse(views)
    assert len(plan.members) == 14
    for member in plan.members:
        want = ops.convert_to_numpy(view_function(member)(ops.convert_to_tensor(x)))
        got = host_view_function(member)(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3, err_msg=member)


def test_list_images_reads_folders_csvs_and_files(tmp_path):
    from PIL import Image

    for rel in ("b/2.png", "a/1.jpg", "c.txt", "a/z/3.webp"):
        path = tmp_path / "imgs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.new("RGB", (8, 8)).save(path)
    found = list_images(tmp_path / "imgs")
    assert [i for i, _ in found] == ["a/1.jpg", "a/z/3.webp", "b/2.png"]
    # A CSV names files by name only (Shopee's test.csv): found below its root.
    pd.DataFrame({"filename": ["3.webp", "1.jpg"]}).to_csv(tmp_path / "t.csv")
    found = list_images(tmp_path / "t.csv", root=tmp_path / "imgs")
    assert [(i, p.rsplit("/", 2)[-2:]) for i, p in found] == [
        ("3.webp", ["z", "3.webp"]),
        ("1.jpg", ["a", "1.jpg"]),
    ]
    one = str(tmp_path / "imgs" / "b" / "2.png")
    assert list_images([one]) == [(one, one)]


def test_read_image_names_what_is_wrong(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name, reason in [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("missing.jpg", "cannot read"),
    ]:
        with pytest.raises(BadImage, match=reason):
            read_image(tmp_path / name, 32)


def test_compare_predictions_figures():
    ref = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]], np.float32)
    exp = np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]], np.float32)
    out = compare_predictions(ref, exp, np.array([0, 1, 1, 1]))
    assert out["images"] == 4 and out["top1_disagreements"] == 1
    assert out["top1_agreement"] == 0.75
    assert out["keras_correct"] == 3 and out["exported_correct"] == 2
    assert out["accuracy_drop_points"] == 25.0
    assert out["max_abs_diff"] == pytest.approx(0.2, abs=1e-6)
    assert "keras_correct" not in compare_predictions(ref, exp)


def test_writers_count_skipped_files_and_fill_a_submission(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    result = FilePredictions(
        ["x/a.jpg", "b.jpg"], probs, ["03", "17"], [("c.jpg", "empty file")]
    )
    df = write_predictions(result, str(tmp_path / "p.csv"))
    assert df.attrs["summary"] == {"images": 2, "skipped": 1}
    text = (tmp_path / "p.csv").read_text().splitlines()
    assert text == ["path,category,probability", "x/a.jpg,03,0.9", "b.jpg,17,0.8"]
    # A submission needs every id: the unreadable one gets the mean prediction.
    sub = write_predictions(
        result, str(tmp_path / "s.csv"), "shopee", expected=["a.jpg", "b.jpg", "c.jpg"]
    )
    assert sub.set_index("filename")["category"].to_dict() == {
        "a.jpg": "03",
        "b.jpg": "17",
        "c.jpg": "03",  # mean of (0.9, 0.1) and (0.2, 0.8): class 03
    }
    assert sub.attrs["summary"] == {"images": 2, "skipped": 1}
    # Class names: the named format, from the same table, with probabilities.
    named = FilePredictions(["x/a.jpg", "b.jpg"], probs, ["shirt", "bag"])
    write_predictions(named, str(tmp_path / "n.csv"), "named", probability=True)
    text = (tmp_path / "n.csv").read_text().splitlines()
    assert text == ["filename,category,probability", "a.jpg,shirt,0.9", "b.jpg,bag,0.8"]
    with pytest.raises(ValueError, match="shopee format takes classes that are num"):
        write_predictions(named, str(tmp_path / "x.csv"), "shopee")


def test_read_contract_says_how_to_get_one(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="shopee-tpu export"):
        read_contract(tmp_path / "model.tflite")
