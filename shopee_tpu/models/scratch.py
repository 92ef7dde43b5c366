"""What our from-scratch backbones (``tiny-cnn``, ``small-resnet``) share: the
registry's input contract on the way in, the head and our own runs' weights on
the way out, so each builder holds only its layers."""

from __future__ import annotations

import keras
from keras import layers

from shopee_tpu.models import layers as common
from shopee_tpu.models.weights import loader


def scratch_input(
    name: str,
    *,
    weights: str | None,
    weights_preprocessing: str,
    input_size: int | None,
    native_size: int,
    any_size: bool,
):
    """``(inputs, normalised pixels)``: a 0..255 RGB input of ``input_size``
    (the native size by default, open with ``any_size``), normalised inside the
    model as our EfficientNet does (``rescaling``, ``normalization``).

    Raises:
        ValueError: ``weights="imagenet"`` (there are none for these backbones),
            or an unknown ``weights_preprocessing``.
    """
    if weights == "imagenet":
        raise ValueError(f"{name} has no ImageNet weights; pass weights=None")
    loader.check_preprocessing(weights_preprocessing)
    side = None if any_size else int(input_size or native_size)
    inputs = keras.Input((side, side, 3), name="input_layer")
    return inputs, common.normalized_pixels(inputs)


def scratch_model(
    inputs,
    features,
    name: str,
    num_classes: int,
    *,
    include_top: bool,
    dropout: float,
    weights: str | None,
    weights_preprocessing: str,
) -> keras.Model:
    """The model from ``inputs`` to the shared head on ``features`` (or to the
    pooled features without the top), with weights from a file or run folder of
    this backbone when given."""
    if include_top:
        outputs = common.classifier_head(features, num_classes, dropout=dropout)
    else:
        outputs = layers.GlobalAveragePooling2D(name=common.POOL_NAME)(features)
    model = keras.Model(inputs, outputs, name=name)
    if weights is None:
        loader.set_preprocessing(model, weights_preprocessing)
    else:
        loader.load_weights(model, weights, preprocessing=weights_preprocessing)
    return model
