"""The 2020 ``efficientnet`` package's h5 files (imagenet, noisy-student, advprop) in
our EfficientNet, checked against the package itself, plus the weights error table.

The files are made by the real package (1.1.1) under tf_keras, in a subprocess with
``TF_USE_LEGACY_KERAS=1``, with fixed non-trivial weights (random BatchNorm
statistics and SE biases), named as the package and the Kaggle datasets name them.
The reference features are the original model's on the same real photos, fed
through the package's own ``preprocess_input`` (or ``x/127.5 - 1`` for advprop).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from conftest import run_python

from shopee_tpu.models import (
    WeightsError,
    WeightsNotFoundError,
    build_model,
    efficientnet,
    load_weights,
)

# One worker runs this module: its module fixture makes the files once.
pytestmark = [pytest.mark.xdist_group("efficientnet_package"), pytest.mark.slow]

B0_IMAGENET = "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5"
B0_ADVPROP = "efficientnet-b0_advprop_notop.h5"
B0_NS_TOP = "efficientnet-b0_noisy-student.h5"
B3_NS = "efficientnet-b3_noisy-student_notop.h5"
MOBILENET = "mobilenet_v2_notop.h5"

NAMES = {
    "b0_imagenet": B0_IMAGENET,
    "b0_advprop": B0_ADVPROP,
    "b0_ns_top": B0_NS_TOP,
    "b3_ns": B3_NS,
    "mobilenet": MOBILENET,
}

# Runs in a subprocess: sys.argv = [_, output folder, JSON of NAMES].
_MAKE_FILES = r"""
import json, os, sys
import numpy as np
import tf_keras
import efficientnet.tfkeras as efn

out, names = sys.argv[1], json.loads(sys.argv[2])
assert tf_keras.__version__.startswith("2."), tf_keras.__version__


def perturb(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 1.5, v.shape),
            ])
        elif isinstance(layer, tf_keras.layers.Conv2D) and layer.use_bias:
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.2, b.shape)])


def make(ctor, key, size, seed, top=False):
    tf_keras.utils.set_random_seed(seed)
    model = ctor(weights=None, include_top=top, input_shape=(size, size, 3),
                 pooling=None if top else "avg")
    perturb(model, seed)
    model.save_weights(os.path.join(out, names[key]))
    return model


x64 = np.load(os.path.join(out, "images64.npy"))
x67 = np.load(os.path.join(out, "images67.npy"))
torch_mode = lambda x: efn.preprocess_input(x.copy())
ref = {}
m = make(efn.EfficientNetB0, "b0_imagenet", 64, 1)
ref["b0_imagenet"] = m.predict(torch_mode(x64), verbose=0)
ref["b0_imagenet_fed_advprop"] = m.predict(x64 / 127.5 - 1, verbose=0)
m = make(efn.EfficientNetB0, "b0_advprop", 64, 2)
ref["b0_advprop"] = m.predict(x64 / 127.5 - 1, verbose=0)
m = make(efn.EfficientNetB0, "b0_ns_top", 64, 3, top=True)
ref["b0_top_probs"] = m.predict(torch_mode(x64), verbose=0)
m = make(efn.EfficientNetB3, "b3_ns", 67, 4)
ref["b3_noisy_student"] = m.predict(torch_mode(x67), verbose=0)
tf_keras.applications.MobileNetV2(
    weights=None, include_top=False, input_shape=(64, 64, 3)
).save_weights(os.path.join(out, names["mobilenet"]))
np.savez(os.path.join(out, "reference.npz"), **ref)
"""


def _photos(size: int) -> np.ndarray:
    """Real photos (scikit-learn's and scikit-image's samples) at ``size`` px."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    photos += [skimage.data.astronaut(), skimage.data.coffee()]
    return np.stack(
        [
            np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR))
            for p in photos
        ]
    ).astype("float32")


@pytest.fixture(scope="module")
def package_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficientnet_package")
    images = {size: _photos(size) for size in (64, 67)}  # 67: odd-size padding
    for size, x in images.items():
        np.save(out / f"images{size}.npy", x)
    run_python(
        f"import sys; sys.argv = ['make', {str(out)!r}, {json.dumps(NAMES)!r}]\n"
        + _MAKE_FILES,
        env={"TF_USE_LEGACY_KERAS": "1"},
        timeout=900,
    )
    ref = dict(np.load(out / "reference.npz"))
    return {"dir": out, "x64": images[64], "x67": images[67], "ref": ref}


def _path(files, name) -> str:
    return os.path.join(files["dir"], name)


def _features(model, x) -> np.ndarray:
    return np.asarray(model(x, training=False))


def assert_close(actual, expected, tol=1e-4):
    """atol 1e-4 relative to the scale of the expected values."""
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(np.asarray(actual) - expected).max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x scale {scale:.3g}"


def _far(actual, expected, tol=1e-4):
    scale = float(np.abs(expected).max())
    return float(np.abs(np.asarray(actual) - expected).max()) > 10 * tol * scale


def test_imagenet_and_advprop_files_match_the_package(package_files):
    f, ref, x = package_files, package_files["ref"], package_files["x64"]
    # ImageNet (autoaugment) file: "auto" sets the package's torch-mode mean/std.
    b0 = efficientnet(
        0, 10, input_size=64, include_top=False, weights=_path(f, B0_IMAGENET)
    )
    assert_close(_features(b0, x), ref["b0_imagenet"])
    # advprop in the name: "auto" sets x/127.5 - 1 ...
    adv = efficientnet(
        0, 10, input_size=64, include_top=False, weights=_path(f, B0_ADVPROP)
    )
    assert_close(_features(adv, x), ref["b0_advprop"])
    # ... which is measurably not what the ImageNet normalisation would give.
    wrong = efficientnet(
        0,
        10,
        input_size=64,
        include_top=False,
        weights=_path(f, B0_ADVPROP),
        weights_preprocessing="imagenet",
    )
    assert _far(_features(wrong, x), ref["b0_advprop"])
    # The override applies to any file: the ImageNet file fed advprop-style.
    forced = efficientnet(
        0,
        10,
        input_size=64,
        include_top=False,
        weights=_path(f, B0_IMAGENET),
        weights_preprocessing="advprop",
    )
    assert_close(_features(forced, x), ref["b0_imagenet_fed_advprop"])
    assert _far(_features(forced, x), ref["b0_imagenet"])


def test_top_file_and_a_second_variant_match_the_package(package_files):
    f, ref = package_files, package_files["ref"]
    # A file with the package's 1000-class classifier ("probs") into a 1000-class
    # model: the probabilities are the package's.
    top = build_model(
        "efficientnet-b0", 1000, input_size=64, weights=_path(f, B0_NS_TOP)
    )
    assert_close(_features(top, package_files["x64"]), ref["b0_top_probs"])
    # The same file into 10 classes: backbone loaded, classifier fresh, one warning.
    with pytest.warns(UserWarning, match="1000-class classifier.*10 classes"):
        ten = efficientnet(0, 10, input_size=64, weights=_path(f, B0_NS_TOP))
    assert ten.output.shape == (None, 10)
    np.testing.assert_array_equal(
        ten.get_layer("top_conv").get_weights()[0],
        top.get_layer("top_conv").get_weights()[0],
    )
    # B3 at an odd input size (67 px: every stride-2 pad is the odd case).
    b3 = efficientnet(3, 10, input_size=67, include_top=False, weights=_path(f, B3_NS))
    assert_close(_features(b3, package_files["x67"]), ref["b3_noisy_student"])


def test_load_weights_reports_what_it_set(package_files):
    f = package_files
    model = efficientnet(0, 10, input_size=64, include_top=False)
    report = load_weights(model, _path(f, B0_ADVPROP))
    assert report["preprocessing"] == "advprop" and report["run"] is None
    norm = model.get_layer("normalization").get_weights()
    np.testing.assert_allclose(norm[0], 0.5)
    np.testing.assert_allclose(norm[1], 0.25)


def test_error_table(package_files, tmp_path):
    f = package_files
    # Another variant: a B3 file into a B0 names both and the fix.
    with pytest.raises(WeightsError) as e:
        efficientnet(0, 10, input_size=64, weights=_path(f, B3_NS))
    message = str(e.value)
    assert B3_NS in message and "EfficientNet-B3" in message
    assert "EfficientNet-B0" in message and "efficientnet-b3" in message
    assert "\n" not in message
    # Another architecture.
    with pytest.raises(WeightsError, match="MobileNetV2 weights.*efficientnet-b0"):
        efficientnet(0, 10, input_size=64, weights=_path(f, MOBILENET))
    # A missing file, and a folder without weights: FileNotFoundError too.
    with pytest.raises(WeightsNotFoundError, match="nope.h5: no such"):
        efficientnet(0, 10, input_size=32, weights=str(tmp_path / "nope.h5"))
    with pytest.raises(FileNotFoundError, match="a folder without best.weights.h5"):
        efficientnet(0, 10, input_size=32, weights=str(tmp_path))
    # Another class count, where it must match (a run's own weights).
    model = efficientnet(0, 10, input_size=64)
    with pytest.raises(WeightsError, match="1000-class classifier.*10 classes"):
        load_weights(model, _path(f, B0_NS_TOP), head="strict")
    # Options that cannot apply.
    with pytest.raises(ValueError, match="weights_preprocessing='torch'"):
        efficientnet(0, 10, input_size=32, weights_preprocessing="torch")
    with pytest.raises(ValueError, match="resnet50.*leave it at 'auto'"):
        build_model("resnet50", 10, input_size=32, weights_preprocessing="advprop")


def test_cli_prints_weights_errors_as_one_line(package_files, digits_records, capsys):
    from shopee_tpu.cli import main

    for weights, expected in (
        (_path(package_files, B3_NS), "the file holds EfficientNet-B3 weights"),
        ("/nowhere/b0_notop.h5", "/nowhere/b0_notop.h5: no such weights file"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(
                [
                    "train",
                    "--set",
                    f"data.train={digits_records['train']}",
                    "--set",
                    "data.image_size=32",
                    "--set",
                    f"model.weights={weights}",
                    "--set",
                    "device=cpu",
                    "--set",
                    f"out_dir={package_files['dir'] / 'cli_run'}",
                ]
            )
        err = capsys.readouterr().err.strip()
        assert code == 1
        assert expected in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
