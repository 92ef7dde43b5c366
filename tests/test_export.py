"""Export end to end: a demo-like run (tiny-cnn trained on the whole digits set,
about 10 s of training on 2 quiet cores) exported to every format, each file
reloaded in its own runtime (ai-edge-litert, onnxruntime, TensorFlow) on the
held-out digits; prediction on the same images as plain files, with the run and
with the exported models (the latter in a process that never imports TensorFlow
or Keras)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, run_python

# One worker runs this module: its fixtures train and export once.
pytestmark = [pytest.mark.xdist_group("export"), pytest.mark.slow]

EXPORTS = {
    "litert": ("litert", None),
    "litert-float16": ("litert", "float16"),
    "litert-int8": ("litert", "int8"),
    "onnx": ("onnx", None),
    "saved_model": ("saved_model", None),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shopee_tpu.config import RunConfig
    from shopee_tpu.data.read.files import list_files
    from shopee_tpu.data.samples.digits import make_digits_dataset
    from shopee_tpu.data.write.records import write_records_from_csv
    from shopee_tpu.deploy.check import keras_probabilities, record_images
    from shopee_tpu.inference.run import load_run_model
    from shopee_tpu.training import train

    root = tmp_path_factory.mktemp("export")
    info = make_digits_dataset(root / "digits", image_size=32, seed=0)
    train_records = write_records_from_csv(
        info["train_csv"], info["train_images"], root / "train", shards=4, workers=1
    )
    # The held-out digits with their labels, to score each export on.
    write_records_from_csv(
        info["test_labels_csv"],
        info["test_images"],
        root / "test",
        shards=1,
        workers=1,
        label_map=train_records["label_map"],
    )
    cfg = RunConfig.preset("demo").override(
        *TINY,
        f"data.train={root / 'train'}",
        f"out_dir={root / 'run'}",
        "epochs=10",
        "optim.ema=false",
        "data.valid_fraction=0.25",
    )
    train(cfg, verbose=0)
    model, config, label_map, size = load_run_model(root / "run")
    images, labels = record_images(list_files(root / "test"), 32, 10_000)
    return {
        "root": root,
        "info": info,
        "run": str(root / "run"),
        "test": str(root / "test"),
        "model": model,
        "config": config,
        "label_map": label_map,
        "images": images,
        "labels": labels,
        "keras": keras_probabilities(model, images),
    }


@pytest.fixture(scope="module")
def exports(trained):
    from shopee_tpu.deploy import export

    return {
        name: export(
            trained["run"],
            format,
            quantize=quantize,
            out=trained["root"] / name,
            check=trained["test"],
            verbose=False,
        )
        for name, (format, quantize) in EXPORTS.items()
    }


def _reported_is_recomputed(check: dict, keras, exported, labels) -> None:
    """The figures export reported are the ones these runs give, exactly."""
    n = len(labels)
    keras_correct = int((keras.argmax(-1) == labels).sum())
    exported_correct = int((exported.argmax(-1) == labels).sum())
    agree = int((keras.argmax(-1) == exported.argmax(-1)).sum())
    assert check["images"] == n
    assert check["keras_correct"] == keras_correct
    assert check["exported_correct"] == exported_correct
    assert check["top1_disagreements"] == n - agree
    assert check["max_abs_diff"] == float(np.abs(keras - exported).max())
    drop = round(100 * (keras_correct - exported_correct) / n, 4)
    assert check["accuracy_drop_points"] == drop


@pytest.mark.parametrize("name", ["litert", "onnx", "saved_model"])
def test_float32_exports_give_the_keras_probabilities_in_their_own_runtime(
    trained, exports, name
):
    from shopee_tpu.inference.exported import FORMATS, load_exported

    result = exports[name]
    model = load_exported(result.folder)
    assert model.path == os.path.join(result.folder, FORMATS[name])
    probs = model.predict(trained["images"])
    assert len(probs) == len(trained["labels"]) >= 300
    assert np.abs(probs - trained["keras"]).max() <= 1e-4
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # softmax inside
    _reported_is_recomputed(result.check, trained["keras"], probs, trained["labels"])
    assert result.check["top1_agreement"] == 1.0
    assert result.check["keras_accuracy"] >= 0.9  # a trained model, not noise


@pytest.mark.parametrize("name", ["litert-float16", "litert-int8"])
def test_quantized_litert_keeps_top1_and_reports_its_accuracy_drop(
    trained, exports, name
):
    from shopee_tpu.inference.exported import load_exported

    result = exports[name]
    probs = load_exported(result.model).predict(trained["images"])
    agree = (probs.argmax(-1) == trained["keras"].argmax(-1)).mean()
    assert agree >= 0.99
    _reported_is_recomputed(result.check, trained["keras"], probs, trained["labels"])
    # float16 halves the float32 file; int8 stores a quarter of the weights.
    ratio = result.contract["bytes"] / exports["litert"].contract["bytes"]
    assert ratio < (0.6 if name.endswith("float16") else 0.45)
    assert result.contract["quantize"] == name.split("-")[1]
    if name.endswith("int8"):
        assert result.contract["calibration_images"] == 300


def test_contract_names_the_classes_and_the_preprocessing(trained, exports):
    from shopee_tpu.data.write.sources import class_names

    folder = exports["litert-int8"].folder
    contract = json.loads(open(os.path.join(folder, "model.json")).read())
    classes = class_names(trained["label_map"])
    assert contract["classes"] == classes
    assert open(os.path.join(folder, "labels.txt")).read().split("\n")[:-1] == classes
    assert contract["input"]["shape"] == [None, 32, 32, 3]
    assert contract["input"]["value_range"] == [0, 255]
    assert contract["input"]["dtype"] == "float32"
    assert contract["input"]["channels"] == "RGB"
    assert contract["output"]["shape"] == [None, len(classes)]
    assert contract["tta"] == list(trained["config"].predict.tta)
    assert contract["check"]["source"] == trained["test"]
    assert sorted(os.listdir(folder)) == ["labels.txt", "model.json", "model.tflite"]


def _test_files(trained, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` held-out digits as files, and their ids in the records."""
    table = pd.read_csv(trained["info"]["test_labels_csv"], dtype=str)
    names = table["filename"].tolist()[:n]
    folder = trained["info"]["test_images"]
    return [os.path.join(folder, name) for name in names], names


def test_files_predict_as_the_records_written_from_them(trained, tmp_path):
    from PIL import Image

    from shopee_tpu.data.read.pipeline import load_dataset
    from shopee_tpu.data.write.records import write_records_from_csv
    from shopee_tpu.inference.files import Classifier
    from shopee_tpu.inference.tta import predict

    # Files the writer must resize and re-encode: PNGs and a JPEG of other sizes.
    paths, _ = _test_files(trained, 6)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB").resize((40 + 4 * i, 36 + 2 * i))
        name = f"{i}.{'png' if i % 2 else 'jpg'}"
        image.save(folder / name)
        rows.append({"filename": name, "category": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "test.csv", index=False)
    write_records_from_csv(
        tmp_path / "test.csv", folder, tmp_path / "recs", test=True, shards=1,
        image_size=32, resize="square", workers=1,
    )  # fmt: skip
    classifier = Classifier.from_run(trained["run"])
    assert classifier.tta == ("identity", "shift_2")  # the run's TTA
    got = classifier.predict(folder)
    ds = load_dataset(tmp_path / "recs", image_size=32, batch_size=4, training=False)
    ids, want = predict(trained["model"], ds, tta=("identity", "shift_2"))
    order = [got.ids.index(i) for i in ids]
    np.testing.assert_allclose(got.probs[order], want, atol=1e-6, rtol=0)
    assert got.skipped == []


def test_exported_models_predict_files_without_tensorflow_or_keras(
    trained, exports, tmp_path
):
    from shopee_tpu.inference.files import Classifier

    paths, names = _test_files(trained, 40)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    outs = {name: tmp_path / f"{name}.csv" for name in ("litert", "onnx")}
    code = f"""
import contextlib, io, json, sys
from shopee_tpu.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    for name, out in {json.dumps({k: str(v) for k, v in outs.items()})}.items():
        folder = {json.dumps(str(trained["root"]))} + "/" + name
        assert main(["predict", "--model", folder + "/" + ("model.tflite" if name ==
            "litert" else "model.onnx"), "--images", *{json.dumps(paths)},
            {json.dumps(str(bad))}, "--out", out]) == 0
print(json.dumps({{"loaded": sorted(m for m in sys.modules
    if m.split(".")[0] in ("tensorflow", "keras")), "stderr": err.getvalue()}}))
"""
    report = json.loads(run_python(code).strip().splitlines()[-1])
    assert report["loaded"] == []
    skips = [line for line in report["stderr"].splitlines() if "broken.jpg" in line]
    assert len(skips) == 2 and all(line.endswith("skipped") for line in skips)
    # The run's TTA on the host (numpy views) gives what Keras's TTA gives.
    keras = Classifier.from_run(trained["run"]).predict(paths)
    for out in outs.values():
        df = pd.read_csv(out, dtype={"category": str})
        assert df["path"].tolist() == paths  # the broken file is not a row
        classes = np.array(keras.classes)
        assert df["category"].tolist() == classes[keras.probs.argmax(-1)].tolist()
        np.testing.assert_allclose(df["probability"], keras.probs.max(-1), atol=1e-4)
    assert len(names) == 40


def test_export_from_a_jax_process_runs_on_tensorflow(trained, tmp_path):
    out = tmp_path / "from-jax"
    code = f"""
import json, keras
assert keras.backend.backend() == "jax"
import shopee_tpu as st
result = st.export({str(trained["run"])!r}, "onnx", out={str(out)!r},
                   check={trained["test"]!r}, verbose=False)
print(json.dumps(result.check))
"""
    check = json.loads(run_python(code, env={"KERAS_BACKEND": "jax"}).splitlines()[-1])
    assert check["images"] == len(trained["labels"])
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    assert os.path.isfile(out / "model.onnx")


def test_a_mixed_precision_session_exports_in_float32(trained, tmp_path):
    import keras

    from shopee_tpu.deploy import export
    from shopee_tpu.inference.exported import load_exported

    keras.config.set_dtype_policy("mixed_bfloat16")  # as connect() sets it on a TPU
    try:
        result = export(trained["run"], "onnx", out=tmp_path / "x", check=False)
    finally:
        keras.config.set_dtype_policy("float32")
    probs = load_exported(result.folder).predict(trained["images"])
    assert np.abs(probs - trained["keras"]).max() <= 1e-4
