"""PyTorch-format EfficientNet weights into our EfficientNets.

Two namings are known, and the file says which it uses:

==========================  ===========================================  =============
naming                      keys                                         files
==========================  ===========================================  =============
``efficientnet_pytorch``    ``_conv_stem``, ``_bn0``,                    B0..B7,
                            ``_blocks.N._expand_conv`` / ``_bn0`` /      AdvProp, Lite
                            ``_depthwise_conv`` / ``_bn1`` /
                            ``_se_reduce`` / ``_se_expand`` /
                            ``_project_conv`` / ``_bn2``,
                            ``_conv_head``, ``_bn1``, ``_fc``
timm ``tf_efficientnet_*``  ``conv_stem``, ``bn1``, ``blocks.S.J.conv_pw``   ported from
                            / ``bn1`` / ``conv_dw`` / ``bn2`` /           the TF
                            ``se.conv_reduce`` / ``se.conv_expand`` /     checkpoints
                            ``conv_pwl`` / ``bn3`` (the first stage:
                            ``conv_dw`` / ``bn1`` / ``se`` / ``conv_pw`` /
                            ``bn2``), ``conv_head``, ``bn2``, ``classifier``
==========================  ===========================================  =============

PyTorch keeps convolution kernels as ``[out, in, h, w]`` and dense kernels as
``[out, in]``; Keras as ``[h, w, in, out]`` and ``[in, out]``, and depthwise kernels
as ``[h, w, channels, 1]``. Every tensor is checked against the layer it fills, and
every key of the file must land somewhere: a file for another variant fails on its
first differing tensor, named.
"""

from __future__ import annotations

import re

import numpy as np

from shopee_tpu.models import layers as common
from shopee_tpu.models.weights import torch_files
from shopee_tpu.models.weights.errors import WeightsError
from shopee_tpu.models.weights.h5 import NORMALIZATION_NAME

__all__ = ["assign_state_dict", "load_file", "naming_of"]

_BN = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_SKIPPED = ("num_batches_tracked",)
# efficientnet_pytorch: a block's module -> our layer suffix.
_PYTORCH_BLOCK = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dwconv",
    "_bn1": "bn",
    "_se_reduce": "se_reduce",
    "_se_expand": "se_expand",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_PYTORCH_TOP = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "top_conv",
    "_bn1": "top_bn",
    "_fc": common.CLASSIFIER_NAME,
}
# timm: an inverted-residual block, and the first stage's depthwise-separable one.
_TIMM_BLOCK = {
    "conv_pw": "expand_conv",
    "bn1": "expand_bn",
    "conv_dw": "dwconv",
    "bn2": "bn",
    "se.conv_reduce": "se_reduce",
    "se.conv_expand": "se_expand",
    "conv_pwl": "project_conv",
    "bn3": "project_bn",
}
_TIMM_FIRST = {
    "conv_dw": "dwconv",
    "bn1": "bn",
    "se.conv_reduce": "se_reduce",
    "se.conv_expand": "se_expand",
    "conv_pw": "project_conv",
    "bn2": "project_bn",
}
_TIMM_TOP = {
    "conv_stem": "stem_conv",
    "bn1": "stem_bn",
    "conv_head": "top_conv",
    "bn2": "top_bn",
    "classifier": common.CLASSIFIER_NAME,
}
_PYTORCH_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TIMM_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.([\w.]+)\.(\w+)")


def naming_of(state: dict) -> str:
    """``"efficientnet_pytorch"`` or ``"timm"``, from the stem's key."""
    if "_conv_stem.weight" in state:
        return "efficientnet_pytorch"
    if "conv_stem.weight" in state:
        return "timm"
    raise ValueError("no EfficientNet stem (`_conv_stem.weight` or `conv_stem.weight`)")


def _targets(state: dict, block_prefixes: list[str]) -> dict[str, tuple[str, str]]:
    """``{file key: (our layer name, our weight name)}`` for every key."""
    pytorch = naming_of(state) == "efficientnet_pytorch"
    timm_blocks = sorted(
        {tuple(map(int, m.groups()[:2])) for k in state if (m := _TIMM_KEY.match(k))}
    )
    out = {}
    for key in state:
        if key.endswith(_SKIPPED):
            continue
        module, _, param = key.rpartition(".")
        layer = _layer_of(module, pytorch, block_prefixes, timm_blocks)
        if layer is None:
            raise ValueError(f"unexpected key {key!r}")
        out[key] = (layer, param)
    return out


def _layer_of(module: str, pytorch: bool, prefixes: list[str], timm_blocks) -> str:
    if pytorch:
        if m := _PYTORCH_KEY.match(module + ".x"):
            index, part = int(m[1]), m[2]
            if part in _PYTORCH_BLOCK and index < len(prefixes):
                return prefixes[index] + _PYTORCH_BLOCK[part]
            return None
        return _PYTORCH_TOP.get(module)
    if m := _TIMM_KEY.match(module + ".x"):
        where = (int(m[1]), int(m[2]))
        index = timm_blocks.index(where)
        table = _TIMM_FIRST if where[0] == 0 else _TIMM_BLOCK
        if m[3] in table and index < len(prefixes):
            return prefixes[index] + table[m[3]]
        return None
    return _TIMM_TOP.get(module)


def _block_prefixes(model) -> list[str]:
    """``block1a_``, ``block2a_``, ... in the order the blocks are built."""
    seen = []
    for layer in model.layers:
        m = re.match(r"(block\d+[a-z]+_)", layer.name)
        if m and m[1] not in seen:
            seen.append(m[1])
    return seen


def _keras_value(layer: str, param: str, tensor: np.ndarray) -> tuple:
    """``(our weight name, tensor in Keras layout)``."""
    if layer.endswith("bn"):
        if param not in _BN:
            raise ValueError(f"unexpected BatchNorm tensor {param!r}")
        return _BN[param], tensor
    if param == "bias":
        return "bias", tensor
    if tensor.ndim == 4 and layer.endswith("dwconv"):  # [c, 1, h, w] -> [h, w, c, 1]
        return "kernel", tensor.transpose(2, 3, 0, 1)
    if tensor.ndim == 4:  # [out, in, h, w] -> [h, w, in, out]
        return "kernel", tensor.transpose(2, 3, 1, 0)
    return "kernel", tensor.T  # dense [out, in] -> [in, out]


def load_file(model, path: str) -> dict:
    """Reads the PyTorch or safetensors file at ``path`` into ``model``, which must
    be one of our EfficientNets (the only layer naming the mapping knows)."""
    names = [layer.name for layer in model.layers]
    if "stem_conv" not in names or not any(n.startswith("block1a_") for n in names):
        raise WeightsError(
            f"{path}: PyTorch and safetensors files load into our EfficientNet "
            f"backbones only, not {model.name!r}"
        )
    return assign_state_dict(model, torch_files.read_state_dict(path), path)


def assign_state_dict(model, state: dict, path: str) -> dict:
    """Writes ``state`` (see the module docstring) into ``model``'s layers.

    Returns:
        The report ``load_weights`` expects: ``loaded`` and ``skipped`` layer
        counts and ``head`` (``(file classes, model classes)`` when the classifier
        was left fresh, else ``None``).

    Raises:
        WeightsError: an unknown naming or key, a missing or extra tensor, or a
            tensor of another shape (another variant); named with the file.
    """
    try:
        targets = _targets(state, _block_prefixes(model))
    except ValueError as e:
        raise WeightsError(
            f"{path}: not EfficientNet weights we can read ({e})"
        ) from None
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, str] = {}
    for key, (layer, param) in targets.items():
        name, value = _keras_value(layer, param, state[key])
        by_layer.setdefault(layer, {})[name] = value
        keys[f"{layer}/{name}"] = key
    head = _head(model, by_layer, path)
    loaded = 0
    for layer in model.layers:
        if not layer.weights or layer.name == NORMALIZATION_NAME:
            continue
        if layer.name == common.CLASSIFIER_NAME and head is not None:
            continue
        given = by_layer.pop(layer.name, None)
        if given is None:
            raise WeightsError(
                f"{path}: holds no tensors for layer {layer.name!r} (weights for "
                "another EfficientNet variant?)"
            )
        layer.set_weights(_ordered(layer, given, keys, path))
        loaded += 1
    if by_layer:
        extra = next(iter(by_layer.values()))
        key = keys[f"{next(iter(by_layer))}/{next(iter(extra))}"]
        raise WeightsError(
            f"{path}: tensor {key!r} has no place in {model.name} (weights for "
            "another EfficientNet variant?)"
        )
    return {"loaded": loaded, "skipped": 0, "head": head, "normalization": False}


def _head(model, by_layer: dict, path: str):
    """``None`` when the file's classifier fits the model's; else ``(file classes
    or None, model classes)``, and the file's classifier is dropped."""
    try:
        ours = model.get_layer(common.CLASSIFIER_NAME)
    except ValueError:
        by_layer.pop(common.CLASSIFIER_NAME, None)  # a model without the top
        return None
    given = by_layer.get(common.CLASSIFIER_NAME)
    classes = int(ours.weights[0].shape[-1])
    if given is not None and given["kernel"].shape == tuple(ours.weights[0].shape):
        return None
    by_layer.pop(common.CLASSIFIER_NAME, None)
    return (None if given is None else int(given["kernel"].shape[-1]), classes)


def _ordered(layer, given: dict, keys: dict, path: str) -> list[np.ndarray]:
    out = []
    for weight in layer.weights:
        name = weight.path.rpartition("/")[2]
        if name not in given:
            raise WeightsError(
                f"{path}: holds no {name!r} for layer {layer.name!r} (weights for "
                "another EfficientNet variant?)"
            )
        value = given.pop(name)
        if tuple(value.shape) != tuple(weight.shape):
            key, stored = keys[f"{layer.name}/{name}"], value.shape
            raise WeightsError(
                f"{path}: tensor {key!r} has shape {_file_layout(stored)}, layer "
                f"{layer.name!r} wants {_file_layout(tuple(weight.shape))} "
                "(weights for another EfficientNet variant?)"
            )
        out.append(
            value.astype(weight.dtype if weight.dtype != "bfloat16" else "float32")
        )
    if given:
        name = next(iter(given))
        raise WeightsError(
            f"{path}: tensor {keys[f'{layer.name}/{name}']!r} has no place in "
            f"layer {layer.name!r}"
        )
    return out


def _file_layout(shape: tuple) -> tuple:
    """A Keras kernel shape as PyTorch stores it (``[out, in, h, w]``, dense
    ``[out, in]``); a depthwise ``[h, w, c, 1]`` reads ``[c, 1, h, w]``."""
    if len(shape) == 4 and shape[3] == 1:
        return (shape[2], 1, shape[0], shape[1])
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1])
