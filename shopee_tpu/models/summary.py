"""``describe(model)``: parameters and compute per part of a model, as a table.

Compute is counted analytically from each layer's input and output shapes, as
multiply-accumulates (MACs) per image: ``Conv2D`` (grouped too),
``DepthwiseConv2D``, ``SeparableConv2D`` and ``Dense`` (also when applied per
pixel, as in ConvNeXt). Normalisation, activations, pooling and element-wise ops
are left out. This is the convention behind the EfficientNet paper's "FLOPs"
(B0: 0.39 B), so ``gmacs`` compares with the paper's column; hardware FLOPs are
about twice the MACs. It needs no profiler, so it works on every backend.
"""

from __future__ import annotations

import math
import re

import keras

from shopee_tpu.models import layers as common

_PART_PATTERNS = (
    (re.compile(r"^(stem|top)_"), lambda m: m[1]),
    (re.compile(r"^block(\d+)"), lambda m: f"block{m[1]}"),
    (re.compile(r"^(conv|pool)(\d+)_"), lambda m: f"{m[1]}{m[2]}"),
    (re.compile(r"_stage_(\d+)_"), lambda m: f"stage{m[1]}"),
    (re.compile(r"_(stem|downsampling_block_\d+)"), lambda m: m[1]),
)
_INPUT_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    common.ImageNetPreprocess,
)


def layer_macs(layer) -> int:
    """Multiply-accumulates per image of one layer (0 for layers without any)."""
    if isinstance(layer, keras.Model):
        return sum(layer_macs(sub) for sub in layer.layers)
    try:
        inp, out = layer.input.shape, layer.output.shape
    except (AttributeError, ValueError):
        return 0
    if isinstance(inp, list):
        return 0
    if isinstance(layer, keras.layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        cin, mult = inp[-1], layer.depth_multiplier
        pixels = out[1] * out[2]
        return int(pixels * (kh * kw * cin * mult + cin * mult * out[-1]))
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return int(out[1] * out[2] * out[-1] * kh * kw)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1) or 1
        return int(out[1] * out[2] * out[-1] * kh * kw * inp[-1] // groups)
    if isinstance(layer, keras.layers.Dense):
        positions = math.prod(int(d) for d in out[1:-1]) if len(out) > 2 else 1
        return int(positions * inp[-1] * out[-1])
    return 0


def _part(layer) -> str:
    if common.is_head_layer(layer):
        return "head"
    # A nested backbone (KerasHub); keras.applications' ConvNeXt stem is a small
    # Sequential, which is part of the stem.
    if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential):
        return "backbone"
    if isinstance(layer, _INPUT_LAYERS):
        return "input"
    for pattern, label in _PART_PATTERNS:
        m = pattern.search(layer.name)
        if m:
            return label(m)
    return "other"


def _count(weights) -> int:
    return int(sum(math.prod(int(d) for d in w.shape) for w in weights))


def describe(model: keras.Model, *, by: str = "part"):
    """A table of parameters and MACs per image, by model part or by layer.

    Args:
        model: A built model (any from ``shopee_tpu.models``, or another Keras one).
        by: ``"part"`` (stem, block1..7, top, head, ...; ResNet ``conv2``..,
            ConvNeXt ``stage0``..) or ``"layer"``.

    Returns:
        ``pandas.DataFrame`` indexed by part (or layer) with columns ``layers``,
        ``params``, ``trainable``, ``macs``, ``output``, and a final ``total`` row.
        ``df.attrs`` holds ``name``, ``input_size``, ``params``,
        ``trainable_params``, ``macs`` and ``gmacs`` (MACs per image / 1e9).
    """
    import pandas as pd

    if by not in ("part", "layer"):
        raise ValueError(f"by={by!r}: expected 'part' or 'layer'")
    rows: dict[str, dict] = {}
    for layer in model.layers:
        key = _part(layer) if by == "part" else layer.name
        row = rows.setdefault(
            key, {"layers": 0, "params": 0, "trainable": 0, "macs": 0, "output": ""}
        )
        row["layers"] += 1
        row["params"] += _count(layer.weights)
        row["trainable"] += _count(layer.trainable_weights)
        row["macs"] += layer_macs(layer)
        try:
            row["output"] = str(tuple(layer.output.shape[1:]))
        except (AttributeError, ValueError):
            pass
    total = {
        "layers": len(model.layers),
        "params": model.count_params(),
        "trainable": _count(model.trainable_weights),
        "macs": sum(r["macs"] for r in rows.values()),
        "output": str(tuple(model.output.shape[1:])),
    }
    df = pd.DataFrame.from_dict({**rows, "total": total}, orient="index")
    df.index.name = by
    shape = (
        model.input_shape[0]
        if isinstance(model.input_shape, list)
        else model.input_shape
    )
    df.attrs.update(
        name=model.name,
        input_size=shape[1],
        params=total["params"],
        trainable_params=total["trainable"],
        macs=total["macs"],
        gmacs=round(total["macs"] / 1e9, 4),
    )
    return df
