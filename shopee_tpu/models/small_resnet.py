"""``small-resnet``: a residual CNN for images of 28 to 64 pixels, sized for CPUs.

An EfficientNet is built for 224-600 px photographs: at 28 px its stem and five
stride-2 stages leave a 1 x 1 map after the third stage, and its depthwise
convolutions, squeeze-excite blocks and swish spend a CPU's time on memory
traffic rather than arithmetic. For Fashion-MNIST, MNIST and CIFAR-sized images
this family does what the small-image literature does (He et al.'s CIFAR
ResNets, their wide variants): a 3 x 3 stem at full resolution, then three
stages of basic residual blocks (two 3 x 3 convolutions with batch norm and
ReLU) at ``width``, ``2 width`` and ``4 width`` filters, the last two starting
with a stride of 2, so a 28 px image ends on a 7 x 7 map.

Names: ``small-resnet`` (width 32, one block a stage), ``small-resnet-w48``,
``small-resnet-w32-b2`` (two blocks a stage). ``docs/benchmarks.md`` has what it
scored on Fashion-MNIST and how fast it trains on two CPU cores.

It keeps the registry's contract: 0..255 pixels (RGB; a grey image arrives as
three equal channels) normalised inside the model by the same ``rescaling`` and
``normalization`` layers as our EfficientNet, the shared head, an open input side
on request (``same`` padding is defined for any side), and ``keras`` layers only,
so it runs on TensorFlow and JAX.
"""

from __future__ import annotations

import re

import keras
from keras import layers

from shopee_tpu.models.scratch import scratch_input, scratch_model

NAME = "small-resnet"
NATIVE_SIZE = 32
WIDTH, BLOCKS = 32, 1
_PATTERN = re.compile(r"small[-_ ]?resnet(?:[-_ ]?w(?P<w>\d+))?(?:[-_ ]?b(?P<b>\d+))?")

# As keras.applications' ResNets initialise their convolutions (He normal, by
# the output fan): a config, so that each layer draws its own seed.
CONV_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}


def parse(name: str) -> tuple[int, int] | None:
    """``(width, blocks)`` of a ``small-resnet`` name, ``None`` for other names."""
    match = _PATTERN.fullmatch(str(name).strip().lower())
    if match is None:
        return None
    width, blocks = int(match["w"] or WIDTH), int(match["b"] or BLOCKS)
    if width < 1 or blocks < 1:
        raise ValueError(f"{name!r}: width and blocks must be at least 1")
    return width, blocks


def _conv_bn(x, filters: int, bn: dict, name: str, *, stride=1, act=True):
    x = layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=CONV_INITIALIZER,
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=bn["momentum"], name=f"{name}_bn")(x)
    return layers.Activation(bn["activation"], name=f"{name}_act")(x) if act else x


def _block(x, filters: int, stride: int, bn: dict, name: str):
    """A basic residual block; a 1 x 1 projection where the shape changes."""
    y = _conv_bn(x, filters, bn, f"{name}_1", stride=stride)
    y = _conv_bn(y, filters, bn, f"{name}_2", act=False)
    if stride != 1 or x.shape[-1] != filters:
        x = layers.Conv2D(
            filters,
            1,
            strides=stride,
            use_bias=False,
            kernel_initializer=CONV_INITIALIZER,
            name=f"{name}_shortcut_conv",
        )(x)
        x = layers.BatchNormalization(
            momentum=bn["momentum"], name=f"{name}_shortcut_bn"
        )(x)
    x = layers.Add(name=f"{name}_add")([x, y])
    return layers.Activation(bn["activation"], name=f"{name}_out")(x)


def small_resnet(
    num_classes: int,
    *,
    width: int = WIDTH,
    blocks: int = BLOCKS,
    weights: str | None = None,
    input_size: int | None = None,
    activation: str = "auto",
    dropout: float = 0.0,
    include_top: bool = True,
    batchnorm_momentum: float = 0.99,
    weights_preprocessing: str = "auto",
    any_size: bool = False,
) -> keras.Model:
    """Builds ``small-resnet``: a stem and three stages of ``blocks`` blocks.

    Args:
        num_classes: Classifier outputs (ignored without the top).
        width: Filters of the stem and the first stage (doubled at each of the
            next two).
        blocks: Residual blocks a stage.
        weights: ``None`` or a path to a file or run folder of this backbone
            (there are no ImageNet weights for it).
        input_size: Side of the square input; ``None``: 32.
        activation: After each convolution but a block's second (``auto``:
            ReLU).
        dropout: Dropout before the classifier.
        include_top: ``False`` returns the pooled features.
        batchnorm_momentum: BatchNorm moving-average momentum.
        weights_preprocessing: As for EfficientNet (``auto``, ``imagenet``,
            ``advprop``).
        any_size: Leave the input side open.
    """
    inputs, x = scratch_input(
        NAME,
        weights=weights,
        weights_preprocessing=weights_preprocessing,
        input_size=input_size,
        native_size=NATIVE_SIZE,
        any_size=any_size,
    )
    bn = {
        "momentum": batchnorm_momentum,
        "activation": "relu" if activation == "auto" else activation,
    }
    x = _conv_bn(x, width, bn, "stem")
    for stage in range(3):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            name = f"stage{stage + 1}_block{b + 1}"
            x = _block(x, width << stage, stride, bn, name)
    return scratch_model(
        inputs,
        x,
        NAME,
        num_classes,
        include_top=include_top,
        dropout=dropout,
        weights=weights,
        weights_preprocessing=weights_preprocessing,
    )
