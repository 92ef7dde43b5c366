"""Our own runs as weights: ``model.weights=RUN_FOLDER`` loads the run's
``best.weights.h5``, e.g. to fine-tune at a higher resolution; a changed class
count keeps the backbone and starts a fresh head; prediction needs only the run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shopee_tpu.config import RunConfig
from shopee_tpu.models import WeightsError, build_from_config, build_model

# One worker runs this module: its module fixture trains once, not once per worker.
pytestmark = [pytest.mark.xdist_group("weights_runs"), pytest.mark.slow]

SETS = (
    "model.backbone=tiny-cnn",
    "batch_size=16",
    "epochs=1",
    "steps_per_epoch=3",
    "optim.warmup_epochs=0.5",
)


@pytest.fixture(scope="module")
def first_run(digits_records, tmp_path_factory):
    from shopee_tpu.training import train

    out = tmp_path_factory.mktemp("first") / "run"
    cfg = RunConfig.preset("demo").override(
        f"data.train={digits_records['train']}", "data.image_size=32", *SETS
    )
    result = train(cfg, out_dir=str(out), verbose=0)
    assert result.metrics["finished"]
    return {"dir": out, "config": cfg, "classes": len(result.label_map)}


def _backbone_weights(model) -> dict:
    return {
        layer.name: layer.get_weights()
        for layer in model.layers
        if layer.weights and layer.name != "predictions"
    }


def test_run_folder_loads_at_a_larger_size_and_fresh_head(first_run):
    from shopee_tpu.inference.run import load_run_model

    source, *_ = load_run_model(first_run["dir"])
    expected = _backbone_weights(source)
    # The same classes at 48 px instead of 32: everything loads.
    model = build_model(
        "tiny-cnn",
        first_run["classes"],
        input_size=48,
        weights=str(first_run["dir"]),
    )
    assert model.input_shape == (None, 48, 48, 3)
    for name, arrays in _backbone_weights(model).items():
        for a, b in zip(arrays, expected[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(
        model.get_layer("predictions").get_weights()[0],
        source.get_layer("predictions").get_weights()[0],
    )
    # Another class count: the backbone loads, the classifier starts fresh.
    with pytest.warns(UserWarning, match="10-class classifier.*4 classes"):
        four = build_model("tiny-cnn", 4, input_size=48, weights=str(first_run["dir"]))
    assert four.output_shape == (None, 4)
    np.testing.assert_array_equal(
        four.get_layer("conv3").get_weights()[0],
        source.get_layer("conv3").get_weights()[0],
    )


def test_fine_tune_a_run_at_higher_resolution_then_predict_without_it(
    first_run, digits_records, tmp_path
):
    from shopee_tpu.inference.run import predict_run
    from shopee_tpu.training import train

    source = tmp_path / "source_run"
    shutil.copytree(first_run["dir"], source)
    cfg = RunConfig.preset("demo").override(
        f"data.train={digits_records['train']}",
        "data.image_size=48",
        f"model.weights={source}",
        *SETS,
    )
    # What training starts from: the first run's weights, at 48 px.
    start = build_from_config(cfg.model, first_run["classes"], image_size=48)
    ref = build_from_config(
        first_run["config"].model, first_run["classes"], image_size=32
    )
    ref.load_weights(str(source / "best.weights.h5"))
    np.testing.assert_array_equal(
        start.get_layer("conv1").get_weights()[0],
        ref.get_layer("conv1").get_weights()[0],
    )
    result = train(cfg, out_dir=str(tmp_path / "run48"), verbose=0)
    assert result.metrics["finished"] and result.model.input_shape[1] == 48
    # Predicting the new run needs only that run, not the one it started from.
    shutil.rmtree(source)
    out = tmp_path / "sub.csv"
    predict_run(
        tmp_path / "run48",
        digits_records["test"],
        out=str(out),
        expected=digits_records["test_csv"],
    )
    assert out.exists()


def test_run_folder_errors_name_what_differs(first_run, tmp_path):
    from shopee_tpu.inference.run import load_run_model

    # A run of another backbone: both names, one line.
    with pytest.raises(WeightsError) as e:
        build_model("efficientnet-b0", 10, input_size=32, weights=str(first_run["dir"]))
    assert "model.backbone=tiny-cnn" in str(e.value)
    assert "efficientnet-b0" in str(e.value) and "\n" not in str(e.value)
    # A run whose label map does not fit its weights: strict when predicting.
    broken = tmp_path / "broken"
    shutil.copytree(first_run["dir"], broken)
    label_map = json.loads((broken / "label_map.json").read_text())
    label_map["extra"] = len(label_map)
    (broken / "label_map.json").write_text(json.dumps(label_map))
    with pytest.raises(WeightsError, match="10-class classifier.*11 classes"):
        load_run_model(broken)
