"""Our EfficientNet builder against keras.applications: sizes, weights, options."""

from __future__ import annotations

import hashlib
import re
import warnings
from unittest import mock

import keras
import numpy as np
import pytest
from conftest import photo_crops, run_python

from shopee_tpu.models import (
    WeightsUnavailableError,
    build_model,
    describe,
    drop_connect_rates,
    efficientnet,
    freeze_backbone,
    scaling,
    unfreeze_backbone,
)
from shopee_tpu.models.efficientnet_scaling import block_count, round_filters
from shopee_tpu.models.weights import records as weights
from shopee_tpu.models.weights.records import fetch_efficientnet_imagenet

# keras.applications.EfficientNetB{n}(weights=None) with 1000 classes (measured in
# the research note, equal to the keras-io table) and its MBConv block counts.
GOLDEN_PARAMS = [
    5_330_571,
    7_856_239,
    9_177_569,
    12_320_535,
    19_466_823,
    30_562_527,
    43_265_143,
    66_658_687,
]
GOLDEN_BLOCKS = [16, 23, 23, 26, 32, 39, 45, 55]


def _block_prefixes(model) -> list[str]:
    seen = []
    for layer in model.layers:
        m = re.match(r"^(block\d+[a-z]+)_", layer.name)
        if m and m[1] not in seen:
            seen.append(m[1])
    return seen


@pytest.fixture(scope="module")
def b0_imagenet_head():
    """Our B0 at 224 px with the 1000-class head, for the tests that only read it."""
    return efficientnet(0, 1000)


B0_GROUP = pytest.mark.xdist_group("efficientnet_b0")  # the tests reading one B0


@pytest.mark.parametrize("n", [pytest.param(0, marks=B0_GROUP), *range(1, 8)])
@pytest.mark.slow
def test_golden_param_counts_and_drop_connect_b0_to_b7(n, request):
    if n == 0:
        model = request.getfixturevalue("b0_imagenet_head")
    else:
        model = efficientnet(n, 1000)
    assert model.count_params() == GOLDEN_PARAMS[n], f"B{n}"
    assert model.input_shape == (None, *(scaling(n).resolution,) * 2, 3)
    blocks = _block_prefixes(model)
    assert len(blocks) == GOLDEN_BLOCKS[n] == block_count(n)
    # Every drop-connect layer has rate 0.2 * b / (scaled block count).
    drops = {
        layer.name[: -len("_drop")]: layer.rate
        for layer in model.layers
        if layer.name.endswith("_drop")
    }
    assert drops, f"B{n} has no drop-connect layers"
    for name, rate in drops.items():
        b = blocks.index(name)
        assert rate == pytest.approx(0.2 * b / len(blocks)), name
    if n == 7:
        last = blocks[-1]  # block7d: a residual block, so it has the layer
        assert drops[last] == pytest.approx(0.2 * 54 / 55)  # not 0.675
    keras.backend.clear_session()


@B0_GROUP
def test_same_as_keras_applications_b0(b0_imagenet_head):
    ours = b0_imagenet_head
    keras.backend.clear_session()  # keras.applications numbers repeated layer names
    ref = keras.applications.EfficientNetB0(weights=None)
    assert ours.count_params() == ref.count_params() == GOLDEN_PARAMS[0]
    weighted = [
        (layer.name, [tuple(w.shape) for w in layer.weights])
        for layer in ours.layers
        if layer.weights
    ]
    ref_weighted = [
        (layer.name, [tuple(w.shape) for w in layer.weights])
        for layer in ref.layers
        if layer.weights
    ]
    assert weighted == ref_weighted  # same names, order and shapes


# EfficientNet-Lite0..4 with the 1000-class head: trainable parameters (the TF
# reference's README: 4.7M, 5.4M, 6.1M, 8.2M, 13.0M; Lite0 exactly as its
# ImageNet file) and blocks (first and last stages unscaled).
GOLDEN_LITE = [
    (4_652_008, 16),
    (5_416_680, 21),
    (6_092_072, 21),
    (8_197_096, 24),
    (13_006_568, 30),
]


@pytest.mark.parametrize("n", range(5))
def test_lite_variants_fix_stem_head_and_end_stages_without_se(n):
    model = efficientnet(f"lite{n}", 1000, input_size=64)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    blocks = [layer for layer in model.layers if layer.name.endswith("_project_bn")]
    assert (trainable, len(blocks)) == GOLDEN_LITE[n]
    assert model.get_layer("stem_conv").filters == 32
    assert model.get_layer("top_conv").filters == 1280
    assert not [layer for layer in model.layers if "_se_" in layer.name]
    activations = {
        layer.activation.__name__
        for layer in model.layers
        if isinstance(layer, keras.layers.Activation)
    }
    assert activations == {"relu6"}
    assert {"block1a_project_bn", "block7a_project_bn"} <= {b.name for b in blocks}
    assert "block1b_project_bn" not in {b.name for b in blocks}
    assert "block7b_project_bn" not in {b.name for b in blocks}
    keras.backend.clear_session()


def test_drop_connect_rates_use_scaled_block_count():
    for variant in (0, 4, 7, -3.0, 0.5):
        rates = drop_connect_rates(variant, 0.2)
        n = block_count(variant)
        assert len(rates) == n
        assert rates[0] == 0.0
        assert rates[-1] == pytest.approx(0.2 * (n - 1) / n)


def test_rounding_rules():
    assert round_filters(32, 1.0) == 32
    assert round_filters(32, 1.1) == 32  # 35.2 -> 32 (within 10 %)
    assert round_filters(16, 0.5) == 8
    assert round_filters(1280, 2.0) == 2560
    assert round_filters(320, 1.4) == 448
    assert round_filters(8, 0.1) == 8  # never below the divisor


@pytest.mark.slow
def test_phi_variants_build_and_grow_with_phi():
    sizes, params = [], []
    for phi in (-3.0, 0.0, 0.5):
        sc = scaling(phi)
        assert sc.resolution % 8 == 0
        sizes.append(sc.resolution)
        model = efficientnet(phi, 10, input_size=32)
        assert model.output.shape == (None, 10)
        params.append(model.count_params())
        keras.backend.clear_session()
    assert sizes == [144, 224, 240]
    assert params[0] < params[1] < params[2]
    # phi = 0 is B0 exactly, and names parse both ways.
    assert scaling(0.0).width == 1.0 and scaling(0.0).depth == 1.0
    assert scaling("phi-3") == scaling(-3.0)
    assert scaling("b3") == scaling(3)
    with pytest.raises(ValueError, match="0..7"):
        scaling(8)


def _run(model, x):
    return np.asarray(model(x, training=False))


@pytest.mark.slow
def test_weight_transplant_from_keras_applications(tmp_path):
    keras.utils.set_random_seed(3)
    ref = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3))
    rng = np.random.default_rng(0)
    for layer in ref.layers:  # non-trivial BN statistics, so they must load too
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, mean, var = layer.get_weights()
            layer.set_weights(
                [g, b, rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)]
            )
    new_h5 = str(tmp_path / "b0.weights.h5")
    legacy_h5 = str(tmp_path / "b0_full.h5")
    ref.save_weights(new_h5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-format notice
        ref.save(legacy_h5)
    x = photo_crops(2, 64, seed=0).astype("float32")
    # Eager calls: tracing predict() for each model would cost more than the test.
    expected = _run(ref, x)
    features = _run(keras.Model(ref.input, ref.get_layer("avg_pool").output), x)
    for path in (new_h5, legacy_h5):
        ours = efficientnet(0, 1000, input_size=64, weights=path)
        np.testing.assert_allclose(_run(ours, x), expected, atol=1e-5)
        # Other class count: backbone loads, classifier stays fresh (and says so).
        with pytest.warns(UserWarning, match="predictions"):
            ten = efficientnet(0, 10, input_size=64, weights=path)
        assert ten.output.shape == (None, 10)
        backbone = efficientnet(0, 10, input_size=64, weights=path, include_top=False)
        np.testing.assert_allclose(_run(backbone, x), features, atol=1e-5)
    with pytest.raises(ValueError, match="holds EfficientNet-B0 weights.*B1"):
        efficientnet(1, 10, input_size=64, weights=legacy_h5)  # B0 file into B1
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        efficientnet(0, 10, input_size=64, weights=str(tmp_path / "nope.h5"))


def test_imagenet_normalization_quirk_is_fixed_on_load(tmp_path):
    # keras.applications' ImageNet files store the std as the variance.
    src = efficientnet(-3.0, 5, input_size=32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    src.get_layer("normalization").set_weights(
        [np.array(mean), np.array(std), np.array(0)]
    )
    path = str(tmp_path / "quirk.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.save(path)
    model = efficientnet(-3.0, 5, input_size=32, weights=path)
    probe = keras.Model(model.input, model.get_layer("normalization").output)
    x = np.full((1, 32, 32, 3), 200.0, "float32")
    np.testing.assert_allclose(
        _run(probe, x)[0, 0, 0],
        (200 / 255 - np.array(mean)) / np.array(std),
        rtol=1e-5,
    )


DEAD_URL = "http://127.0.0.1:9/"  # offline: nothing listens on port 9

# The checks below that need a fresh interpreter, in one child (its imports cost
# about 10 s): the seeded weights of a process that imported the builder before
# seeding and drew from every RNG since, then the builder's offline error with
# Keras's own cache (KERAS_HOME) empty.
FRESH_PROCESS = f"""
import hashlib, keras
from shopee_tpu.models import build_model, efficientnet
from shopee_tpu.models.weights import records as weights
build_model('tiny-cnn', 3)  # imports everything, draws from the RNGs
for name in ('efficientnet-phi-6', 'tiny-cnn'):
    keras.utils.set_random_seed(3)
    m = build_model(name, 10, input_size=32)
    print('MD5', hashlib.md5(b''.join(w.tobytes() for w in m.get_weights())).hexdigest())
weights.KERAS_WEIGHTS_URL = {DEAD_URL!r}
try:
    efficientnet(0, 10, input_size=32, weights='imagenet')
except weights.WeightsUnavailableError as e:
    print('REFUSED', e)
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> str:
    keras_home = tmp_path_factory.mktemp("keras_home")
    return run_python(FRESH_PROCESS, env={"KERAS_HOME": str(keras_home)})


@pytest.mark.slow
@pytest.mark.xdist_group("efficientnet_child")  # one child for both
def test_imagenet_offline_error_says_how_to_attach_the_file(tmp_path, fresh_process):
    # Offline, and the caches are empty folders.
    with pytest.raises(WeightsUnavailableError) as e:
        with mock.patch.object(weights, "KERAS_WEIGHTS_URL", DEAD_URL):
            fetch_efficientnet_imagenet(0, include_top=False, cache_dir=str(tmp_path))
    message = str(e.value)
    assert "efficientnetb0_notop.h5" in message
    assert "Kaggle dataset" in message and "weights=" in message
    # Through the builder, with Keras's own cache (KERAS_HOME) empty.
    (refused,) = [x for x in fresh_process.splitlines() if x.startswith("REFUSED")]
    assert "Kaggle dataset" in refused
    with pytest.raises(ValueError, match="B0..B7"):
        efficientnet(-1.0, 10, weights="imagenet")


def test_softmax_is_float32_under_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = efficientnet(-3.0, 4, input_size=32)
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
        y = model(photo_crops(2, 32, seed=1).astype("float32"))
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
        np.testing.assert_allclose(np.asarray(y).sum(axis=1), 1.0, atol=1e-5)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_options_activation_momentum_dropout_head():
    model = efficientnet(
        -3.0, 7, input_size=32, activation="relu", batchnorm_momentum=0.9, dropout=0.3
    )
    assert model.get_layer("stem_activation").activation.__name__ == "relu"
    assert model.get_layer("top_bn").momentum == 0.9
    assert model.get_layer("top_dropout").rate == 0.3
    head = model.get_layer("predictions")
    assert head.dtype_policy.compute_dtype == "float32" and head.units == 7
    plain = efficientnet(-3.0, 7, input_size=32)
    names = {layer.name for layer in plain.layers}
    assert "top_dropout" not in names  # dropout defaults to none
    assert (
        efficientnet(2, 3, input_size=32, dropout="official")
        .get_layer("top_dropout")
        .rate
        == 0.3
    )
    # From scratch, the input is standardised with ImageNet statistics.
    probe = keras.Model(plain.input, plain.get_layer("normalization").output)
    x = np.full((1, 32, 32, 3), 100.0, "float32")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(
        _run(probe, x)[0, 0, 0], (100 / 255 - mean) / std, rtol=1e-5
    )
    features = efficientnet(-3.0, 7, input_size=32, include_top=False)
    assert features.output.shape == (None, round_filters(1280, scaling(-3.0).width))


@B0_GROUP
def test_describe_b0_macs_and_params(b0_imagenet_head):
    table = describe(b0_imagenet_head)
    assert table.attrs["input_size"] == 224
    assert table.attrs["params"] == GOLDEN_PARAMS[0]
    # The paper's 0.39 B "FLOPs" for B0 are multiply-accumulates.
    assert 0.38 < table.attrs["gmacs"] < 0.40
    assert table.loc["total", "macs"] == table.drop(index="total")["macs"].sum()
    assert list(table.index[:3]) == ["input", "stem", "block1"]
    assert table.loc["head", "params"] == 1280 * 1000 + 1000


def test_freeze_and_unfreeze_keep_batchnorm_frozen():
    model = efficientnet(-3.0, 5, input_size=32)
    assert freeze_backbone(model) == 2  # the classifier's kernel and bias
    unfreeze_backbone(model)
    bns = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and not any(layer.trainable for layer in bns)
    assert model.get_layer("stem_conv").trainable
    unfreeze_backbone(model, from_block=6)
    assert not model.get_layer("block5a_expand_conv").trainable
    assert model.get_layer("block6a_expand_conv").trainable
    assert (
        model.get_layer("top_conv").trainable
        and model.get_layer("predictions").trainable
    )
    unfreeze_backbone(model, from_block="block7a_")
    assert not model.get_layer("block6a_expand_conv").trainable
    n_all = unfreeze_backbone(model, from_block=1.0)
    n_quarter = unfreeze_backbone(model, from_block=0.25)
    assert 2 < n_quarter < n_all
    with pytest.raises(ValueError, match="matches no"):
        unfreeze_backbone(model, from_block="nothing_")


@pytest.mark.parametrize("size", [64, 40])  # 40: a stride-2 block sees side 5
@pytest.mark.slow
def test_an_open_size_model_is_the_fixed_model_at_its_nominal_size(size):
    fixed = efficientnet("phi-6", 5, input_size=size)
    open_ = efficientnet("phi-6", 5, input_size=size, any_size=True)
    assert open_.input_shape == (None, None, None, 3)
    open_.set_weights(fixed.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    np.testing.assert_allclose(
        open_.predict_on_batch(x), fixed.predict_on_batch(x), rtol=1e-5, atol=1e-6
    )
    # The same weights run at the smaller sides of progressive resizing.
    small = x[:, : size // 2, : size // 2]
    probs = open_.predict_on_batch(small)
    assert probs.shape == (2, 5) and np.allclose(probs.sum(-1), 1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("efficientnet_child")  # one child for both
def test_each_kernel_draws_its_own_start_and_the_seed_alone_decides_it(
    fresh_process,
):
    keras.utils.set_random_seed(3)
    model = efficientnet(-6.0, 10, input_size=32)
    same_shape = [model.get_layer(f"block{b}a_expand_conv") for b in (2, 3)]
    kernels = [layer.kernel.numpy() for layer in same_shape]
    assert kernels[0].shape == kernels[1].shape
    assert not np.array_equal(*kernels)
    # Another process, which imported the builder before seeding, and this one,
    # which has drawn from every RNG since: the same weights (on several JAX hosts
    # a difference stops the run at the first layer).
    here = []
    for name in ("efficientnet-phi-6", "tiny-cnn"):
        keras.utils.set_random_seed(3)
        weights = build_model(name, 10, input_size=32).get_weights()
        here.append(hashlib.md5(b"".join(w.tobytes() for w in weights)).hexdigest())
    there = [x.split()[1] for x in fresh_process.splitlines() if x.startswith("MD5")]
    assert there == here
