"""The backbone registry: every name builds with the same head and input contract."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import photo_crops, run_python

from shopee_tpu.config import ModelConfig, RunConfig
from shopee_tpu.models import (
    available_models,
    build_from_config,
    build_model,
    describe,
    input_spec,
)
from shopee_tpu.models.layers import ImageNetPreprocess
from shopee_tpu.models.registry import resolve

FAMILY_NAMES = [
    n
    for n in available_models()
    if not n.startswith(("efficientnet-", "kerashub:", "small-resnet"))
    and n != "tiny-cnn"
]


def _run(model, x):
    return np.asarray(model(x, training=False))


# One of each family is built (all 20 take ~25 s alone, minutes on a shared CPU);
# the others differ only in the keras.applications constructor, checked by name.
# ResNet50 and ConvNeXt-Tiny are built (and checked the same way) by their own
# tests below, against keras.applications' models.
BUILT = [
    "resnet50v2",
    "densenet121",
    "xception",
    "efficientnetv2-b0",
    "tiny-cnn",
]


def test_every_name_resolves_to_a_keras_constructor():
    assert len(FAMILY_NAMES) == 20
    for name in FAMILY_NAMES:
        kind, family = resolve(name)
        assert kind == "family" and family.name == name
        assert callable(getattr(keras.applications, family.constructor)), name
        assert input_spec(name).size == family.size


def _check_our_head(model, name: str, size: int, classes: int) -> None:
    assert model.name == name
    assert model.input_shape == (None, size, size, 3), name
    assert model.output.shape == (None, classes), name
    head = model.layers[-1]
    assert head.name == "predictions", name
    assert head.dtype_policy.compute_dtype == "float32", name
    assert head.activation is keras.activations.softmax, name
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)
    assert input_spec(model) == (size, (0.0, 255.0))


@pytest.mark.slow
def test_one_of_each_family_builds_with_our_head():
    for name in BUILT:
        size = 72 if name == "xception" else 32
        _check_our_head(build_model(name, 5, input_size=size), name, size, 5)
        keras.backend.clear_session()


@pytest.mark.parametrize(
    "mode, module",
    [
        ("caffe", keras.applications.resnet),
        ("tf", keras.applications.resnet_v2),
        ("tf", keras.applications.xception),
        ("torch", keras.applications.densenet),
    ],
)
def test_preprocess_layer_equals_keras_preprocess_input(mode, module):
    x = photo_crops(2, 8, seed=0).astype("float32")
    expected = module.preprocess_input(x.copy())
    np.testing.assert_allclose(
        _run(ImageNetPreprocess(mode), x), expected, rtol=1e-5, atol=1e-4
    )
    # Inside tf.data too (the data pipeline may run it there).
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(x).map(ImageNetPreprocess(mode))
    np.testing.assert_allclose(next(iter(ds)).numpy(), expected, rtol=1e-5, atol=1e-4)


def _legacy_h5(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path)
    return path


def test_resnet_takes_0_255_and_loads_keras_weights(tmp_path):
    # keras' ResNet50 wants caffe-preprocessed input; ours takes raw pixels.
    ref = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3))
    path = _legacy_h5(ref, str(tmp_path / "resnet50.h5"))
    x = photo_crops(2, 32, seed=1).astype("float32")
    expected = _run(ref, keras.applications.resnet.preprocess_input(x.copy()))
    ours = build_model("resnet50", 1000, input_size=32, weights=path)
    _check_our_head(ours, "resnet50", 32, 1000)
    np.testing.assert_allclose(_run(ours, x), expected, atol=1e-5)
    with pytest.warns(UserWarning, match="predictions"):  # classifier skipped
        ten = build_model("ResNet-50", 10, input_size=32, weights=path)
    assert ten.output.shape == (None, 10)


@pytest.mark.slow
def test_convnext_head_matches_keras_top_model(tmp_path):
    ref = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "convnext.weights.h5")
    ref.save_weights(path)
    ours = build_model("convnext-tiny", 1000, input_size=32, weights=path)
    _check_our_head(ours, "convnext-tiny", 32, 1000)
    assert ours.count_params() == ref.count_params()
    x = photo_crops(1, 32, seed=2).astype("float32")
    np.testing.assert_allclose(_run(ours, x), _run(ref, x), atol=1e-5)
    notop = keras.applications.ConvNeXtTiny(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    path = _legacy_h5(notop, str(tmp_path / "notop.h5"))
    with pytest.warns(UserWarning, match="predictions"):
        model = build_model("convnext-tiny", 4, input_size=32, weights=path)
    gamma = model.get_layer("convnext_tiny_head_layernorm").get_weights()[0]
    np.testing.assert_array_equal(gamma, notop.layers[-1].get_weights()[0])


def test_names_specs_and_errors():
    assert input_spec("efficientnet-b3") == (300, (0.0, 255.0))
    assert input_spec("efficientnet-phi-3").size == 144
    assert input_spec("efficientnet-phi0.5").size == 240
    assert input_spec("xception").size == 299
    assert input_spec("EfficientNetV2-S").size == 384
    assert input_spec("convnext_tiny").size == 224
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'"):
        input_spec("resnet18")
    with pytest.raises(ValueError, match="activation"):
        build_model("resnet50", 3, input_size=32, activation="relu")
    with pytest.raises(ValueError, match="drop_connect_rate"):
        build_model("densenet121", 3, input_size=32, drop_connect_rate=0.3)
    with pytest.raises(ValueError, match="minimum 71"):
        build_model("xception", 3, input_size=64)


def test_batchnorm_momentum_reaches_keras_families():
    model = build_model("efficientnetv2-b0", 3, input_size=32, batchnorm_momentum=0.9)
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bns and all(la.momentum == 0.9 for la in bns)


def test_build_from_config_uses_the_model_section():
    cfg = RunConfig.preset("demo").override("model.drop_connect_rate=0.2")
    model = build_from_config(cfg.model, 10, image_size=64)
    assert model.name == "efficientnet-phi-6"
    assert model.input_shape == (None, 64, 64, 3)
    assert model.get_layer("top_bn").momentum == cfg.model.batchnorm_momentum
    # The last drop-connect layer carries the config's rate scaled by its block.
    drops = [la.rate for la in model.layers if la.name.endswith("_drop")]
    assert 0 < max(drops) < cfg.model.drop_connect_rate
    other = build_from_config(ModelConfig(backbone="densenet121", dropout=0.2), 4, 32)
    assert other.get_layer("top_dropout").rate == 0.2
    assert describe(other).attrs["input_size"] == 32


def test_describe_counts_macs_of_other_families():
    # Published multiply-accumulates at 224 px: ConvNeXt-T 4.5 G (paper), Keras'
    # ResNet50 (stride in the first 1x1 conv) 3.86 G.
    convnext = describe(build_model("convnext-tiny", 1000))
    assert 4.4 < convnext.attrs["gmacs"] < 4.6
    assert convnext.attrs["params"] == 28_589_128  # keras.applications' top model
    assert "stage3" in convnext.index and "stem" in convnext.index
    resnet = describe(build_model("resnet50", 1000))
    assert 3.8 < resnet.attrs["gmacs"] < 4.2
    assert resnet.attrs["params"] == 25_636_712


def test_models_round_trip_through_keras_files(tmp_path):
    x = photo_crops(2, 32, seed=3).astype("float32")
    tiny = build_model("efficientnet-phi-8", 3, input_size=32)
    inputs = keras.Input((32, 32, 3))
    pre = keras.Model(inputs, ImageNetPreprocess("caffe")(inputs))
    for model in (tiny, pre):
        path = str(tmp_path / f"{model.name}.keras")
        model.save(path)
        again = keras.models.load_model(path)
        np.testing.assert_allclose(_run(again, x), _run(model, x), atol=1e-6)


def test_tiny_cnn_keeps_the_input_contract_at_any_size():
    from shopee_tpu.models import supports_any_size

    fixed = build_model("tiny-cnn", 4, input_size=40)
    open_ = build_model("tiny-cnn", 4, any_size=True)
    assert supports_any_size("tiny-cnn") and open_.input_shape == (None, None, None, 3)
    assert input_spec("tiny-cnn") == (32, (0.0, 255.0))
    open_.set_weights(fixed.get_weights())
    x = photo_crops(2, 40, seed=1).astype("float32")
    np.testing.assert_allclose(
        open_.predict_on_batch(x), fixed.predict_on_batch(x), rtol=1e-5, atol=1e-6
    )
    # ImageNet statistics inside the model: 0..255 pixels in, as every backbone.
    probe = keras.Model(fixed.input, fixed.get_layer("normalization").output)
    mean = np.asarray(probe.predict_on_batch(x)).mean()
    assert abs(mean) < 1.5
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("tiny-cnn", 4, weights="imagenet")


def test_small_resnet_names_sizes_and_the_input_contract():
    from shopee_tpu.bench.train import forward_flops
    from shopee_tpu.models import supports_any_size

    assert resolve("small-resnet") == ("small", (32, 1))
    assert resolve("Small_ResNet-w48-b2") == ("small", (48, 2))
    assert "small-resnet[-w<width>][-b<blocks>]" in available_models()
    assert input_spec("small-resnet-w16") == (32, (0.0, 255.0))
    assert supports_any_size("small-resnet")
    # Stem and three stages of basic blocks; 28 px ends on a 7 x 7 map.
    for name, params, mflops in (
        ("small-resnet", 310_001, 75.2),
        ("small-resnet-w48", 693_857, 168.2),
        ("small-resnet-w32-b2", 698_865, 161.9),
    ):
        model = build_model(name, 10, input_size=28)
        assert model.count_params() == params, name
        assert round(forward_flops(model) / 1e6, 1) == mflops, name
    assert model.get_layer("stage3_block2_out").output.shape == (None, 7, 7, 128)
    fixed = build_model("small-resnet-w8", 4, input_size=28, batchnorm_momentum=0.9)
    open_ = build_model("small-resnet-w8", 4, any_size=True)
    assert open_.input_shape == (None, None, None, 3)
    assert fixed.get_layer("stem_bn").momentum == 0.9
    open_.set_weights(fixed.get_weights())
    x = photo_crops(2, 28, seed=1).astype("float32")
    np.testing.assert_allclose(
        open_.predict_on_batch(x), fixed.predict_on_batch(x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("small-resnet", 4, weights="imagenet")
    with pytest.raises(ValueError, match="width and blocks must be at least 1"):
        build_model("small-resnet-w0", 4)


@pytest.mark.slow
def test_small_resnet_predicts_alike_on_tensorflow_and_jax(tmp_path):
    """The same weights give the same probabilities on both backends, and a
    training step runs on JAX (keras layers and ops only)."""
    weights, x = tmp_path / "w.weights.h5", photo_crops(3, 28, seed=2)
    keras.utils.set_random_seed(0)
    model = build_model("small-resnet-w8", 5, input_size=28)
    model.save_weights(weights)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import numpy as np, keras
from shopee_tpu.config import OptimConfig
from shopee_tpu.models import build_model, compile_model
model = build_model("small-resnet-w8", 5, input_size=28)
model.load_weights({str(weights)!r})
x = np.load({str(tmp_path / "x.npy")!r})
np.save({str(tmp_path / "jax.npy")!r}, np.asarray(model.predict_on_batch(x)))
compile_model(model, OptimConfig(optimizer="adamw"), steps_per_epoch=1, epochs=1)
logs = model.train_on_batch(x, np.eye(5, dtype="float32")[[0, 1, 2]], return_dict=True)
print("LOSS", float(logs["loss"]), keras.backend.backend())
"""
    # On JAX every initializer and eager op of the build compiles a program: the
    # session's XLA_FLAGS (conftest) keep those compiles at LLVM's lowest level.
    out = run_python(code, env={"KERAS_BACKEND": "jax"})
    assert "jax" in out and np.isfinite(float(out.split("LOSS ")[1].split()[0]))
    np.testing.assert_allclose(
        np.load(tmp_path / "jax.npy"), model.predict_on_batch(x), rtol=1e-4, atol=1e-5
    )
