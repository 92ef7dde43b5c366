"""``tiny-cnn``: three strided convolutions and our head, for smoke runs and tests.

An EfficientNet's training step takes tens of seconds to trace or compile on a
2-core CPU, even at phi -6 (seven MBConv blocks, about 110 layers); this model
takes a second or two. Runs that prove plumbing rather than a recipe (resuming,
time budgets, k-fold, sweeps, several processes, a notebook's smoke path) spend
their time on what they prove. It learns the bundled digits, but it is no model
for a competition.

It keeps the registry's contract: 0..255 pixels normalised inside the model (the
same ``rescaling`` and ``normalization`` layers as our EfficientNet, so
``weights_preprocessing`` works alike), the shared head, and an open input side
on request (``same`` padding is defined for any side).
"""

from __future__ import annotations

import keras
from keras import layers

from shopee_tpu.models.scratch import scratch_input, scratch_model

NAME = "tiny-cnn"
NATIVE_SIZE = 32
FILTERS = (16, 32, 64)


def tiny_cnn(
    num_classes: int,
    *,
    weights: str | None = None,
    input_size: int | None = None,
    activation: str = "auto",
    dropout: float = 0.0,
    include_top: bool = True,
    batchnorm_momentum: float = 0.99,
    weights_preprocessing: str = "auto",
    any_size: bool = False,
) -> keras.Model:
    """Builds ``tiny-cnn``: three conv-BN-activation stages of stride 2.

    Args:
        num_classes: Classifier outputs (ignored without the top).
        weights: ``None`` or a path to a file or run folder of this backbone
            (there are no ImageNet weights for it).
        input_size: Side of the square input; ``None``: 32.
        activation: Activation after each convolution (``auto``: swish).
        dropout: Dropout before the classifier.
        include_top: ``False`` returns the pooled features.
        batchnorm_momentum: BatchNorm moving-average momentum.
        weights_preprocessing: As for EfficientNet (``auto``, ``imagenet``,
            ``advprop``).
        any_size: Leave the input side open.
    """
    activation = "swish" if activation == "auto" else activation
    inputs, x = scratch_input(
        NAME,
        weights=weights,
        weights_preprocessing=weights_preprocessing,
        input_size=input_size,
        native_size=NATIVE_SIZE,
        any_size=any_size,
    )
    for i, filters in enumerate(FILTERS):
        x = layers.Conv2D(
            filters,
            3,
            strides=2,
            padding="same",
            use_bias=False,
            name=f"conv{i + 1}",
        )(x)
        x = layers.BatchNormalization(momentum=batchnorm_momentum, name=f"bn{i + 1}")(x)
        x = layers.Activation(activation, name=f"activation{i + 1}")(x)
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
