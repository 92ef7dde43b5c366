"""KerasHub presets as backbones: ``model.backbone=kerashub:PATH``.

The preset folder is saved by KerasHub itself (``save_to_preset``) from a small
ResNet with random weights and an image converter with ImageNet mean/std, the
layout of the presets on Kaggle Models. No network is used.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO

from shopee_tpu.models import (
    KerasHubError,
    build_model,
    describe,
    freeze_backbone,
    input_spec,
    unfreeze_backbone,
)

# One worker runs this module: its module fixture trains once, not once per worker.
pytestmark = [pytest.mark.xdist_group("kerashub"), pytest.mark.slow]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    import keras_hub

    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(None, None, 3),
    )
    rng = np.random.default_rng(0)
    for layer in backbone.layers:  # non-trivial BatchNorm statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights(
                [g, b, rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 1.5, v.shape)]
            )
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(40, 40),
        scale=[1 / (255 * s) for s in STD],
        offset=[-m / s for m, s in zip(MEAN, STD)],
    )
    classifier = keras_hub.models.ResNetImageClassifier(
        backbone=backbone,
        num_classes=3,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(
            image_converter=converter
        ),
    )
    path = tmp_path_factory.mktemp("kerashub") / "resnet_tiny"
    classifier.save_to_preset(str(path))
    return {"path": str(path), "backbone": backbone, "converter": converter}


def _photos(size):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return np.stack(
        [
            np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR))
            for p in load_sample_images().images
        ]
    ).astype("float32")


def test_preset_builds_with_its_weights_and_converter(preset):
    name = f"kerashub:{preset['path']}"
    assert input_spec(name).size == 40  # the converter's size
    model = build_model(name, 5, input_size=48, dropout=0.2)
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 5)
    # Same features as KerasHub's own pipeline on 0..255 photos: the preset's
    # converter (without its resize: the pipeline delivers the size), then the
    # saved backbone, then global average pooling.
    import keras_hub

    converter = keras_hub.layers.ImageConverter.from_preset(preset["path"])
    converter.image_size = None
    x = _photos(48)
    ref = keras.layers.GlobalAveragePooling2D()(preset["backbone"](converter(x)))
    ours = keras.Model(model.input, model.get_layer("avg_pool").output)
    ref, out = np.asarray(ref), np.asarray(ours(x, training=False))
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
    # describe(): the backbone is one part with all of its parameters and MACs.
    table = describe(model)
    assert table.loc["backbone", "params"] == preset["backbone"].count_params()
    assert table.loc["backbone", "macs"] > 0
    # Fine-tuning reaches inside the nested backbone.
    assert freeze_backbone(model) == 2  # the classifier's kernel and bias
    partial = unfreeze_backbone(model, 0.5)
    full = unfreeze_backbone(model)
    assert 2 < partial < full
    bn = [w for w in model.trainable_weights if "gamma" in w.path]
    assert not bn  # BatchNorm stays frozen


def test_preset_run_trains_predicts_with_tta_and_ensembles(
    preset, digits_records, tmp_path
):
    from shopee_tpu.config import RunConfig
    from shopee_tpu.inference.ensemble import combine_models, load_probs
    from shopee_tpu.inference.run import predict_run
    from shopee_tpu.training import train

    cfg = RunConfig.preset("demo").override(
        f"data.train={digits_records['train']}",
        f"model.backbone=kerashub:{preset['path']}",
        "model.batchnorm_momentum=0.9",
        "model.drop_connect_rate=0.2",  # the default; the demo preset sets 0
        "data.image_size=32",
        "batch_size=16",
        "epochs=1",
        "steps_per_epoch=2",
        "optim.ema=false",
    )
    result = train(cfg, out_dir=str(tmp_path / "run"), verbose=0)
    assert result.metrics["finished"] and result.metrics["epochs_completed"] == 1
    assert result.model.name.startswith("kerashub-")
    subs = []
    for tta in (("identity", "flip_lr"), ("identity", "shift_2")):
        out = tmp_path / f"sub_{len(subs)}.csv"
        predict_run(
            tmp_path / "run",
            digits_records["test"],
            out=str(out),
            tta=tta,
            expected=digits_records["test_csv"],
        )
        subs.append(load_probs(str(out).replace(".csv", ".probs.npz")))
    n_test = len(subs[0].ids)
    assert n_test > 0 and subs[0].probs.shape == (n_test, 10)
    np.testing.assert_allclose(subs[0].probs.sum(axis=1), 1.0, atol=1e-3)
    ids, combined = combine_models(subs, method="geometric")
    assert sorted(ids) == sorted(subs[0].ids) and combined.shape == (n_test, 10)


def test_preset_errors_are_one_line(preset, tmp_path):
    with pytest.raises(KerasHubError, match="no such preset folder"):
        build_model(f"kerashub:{tmp_path / 'missing'}", 3)
    with pytest.raises(KerasHubError, match="carries its own weights"):
        build_model(f"kerashub:{preset['path']}", 3, weights="imagenet")
    with pytest.raises(ValueError, match="KerasHub preset folder.*model.backbone"):
        build_model("efficientnet-b0", 3, input_size=32, weights=preset["path"])


def test_without_keras_hub_the_cli_names_the_extra(digits_records):
    code = (
        "import sys; sys.modules['keras_hub'] = None\n"  # as if not installed
        "from shopee_tpu.cli import main\n"
        f"sys.exit(main(['train', '--set', 'data.train={digits_records['train']}', "
        "'--set', 'model.backbone=kerashub:/kaggle/input/m/keras/v/1']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if " error: " in line]
    assert len(lines) == 1 and 'pip install "shopee_tpu[hub]"' in lines[0], lines
    assert "Traceback" not in proc.stderr
