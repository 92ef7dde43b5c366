"""Pieces every backbone shares: the 0..255 input contract and the classifier head.

Every model from ``shopee_tpu.models`` takes pixels in 0..255 (uint8 as the
pipeline yields them, or float) and casts and normalises them inside itself, so
the cast runs on the device, and ends in the same head (global average pooling, optional
dropout, ``Dense(num_classes, softmax)`` computed in float32). Keeping both in one
place is what lets the registry promise one contract for every family.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

# ImageNet statistics as keras.applications uses them (RGB order, 0..1 scale).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
# The "caffe" mode of keras.applications (ResNet v1): BGR means on 0..255 pixels.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# Names of the head layers; everything else in a model is "backbone".
POOL_NAME = "avg_pool"
DROPOUT_NAME = "top_dropout"
CLASSIFIER_NAME = "predictions"
HEAD_SUFFIXES = ("_head_layernorm",)  # ConvNeXt's pooled-feature LayerNorm

VALUE_RANGE = (0.0, 255.0)

# A config, so that each classifier draws its own seed (see efficientnet_builder).
DENSE_KERNEL_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"},
}


@keras.saving.register_keras_serializable(package="shopee_tpu")
class ImageNetPreprocess(layers.Layer):
    """``keras.applications`` ``preprocess_input`` as a layer, for 0..255 input.

    Modes match ``keras.applications.imagenet_utils.preprocess_input``:

    * ``caffe``: RGB to BGR, then subtract the ImageNet BGR mean (no scaling);
      ResNet v1.
    * ``tf``: scale to -1..1; ResNet v2 and Xception.
    * ``torch``: scale to 0..1, then standardise with the ImageNet mean and std;
      DenseNet.

    It runs in float32 whatever the dtype policy, so bfloat16 never rounds pixels.
    """

    MODES = ("caffe", "tf", "torch")

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"preprocess mode {mode!r}: expected one of {self.MODES}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.array(IMAGENET_MEAN_RGB, "float32")
            std = ops.array(IMAGENET_STDDEV_RGB, "float32")
            return (x / 255.0 - mean) / std
        return ops.flip(x, axis=-1) - ops.array(CAFFE_MEAN_BGR, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def normalized_pixels(inputs):
    """0..255 RGB pixels -> ImageNet-normalised float32, in the layers named
    ``rescaling`` and ``normalization`` (the mean and variance there are what
    weights files and ``weights_preprocessing`` set).

    float32 whatever the dtype policy, so bfloat16 never rounds raw pixels.
    """
    x = layers.Rescaling(1.0 / 255.0, name="rescaling", dtype="float32")(inputs)
    norm = layers.Normalization(axis=-1, name="normalization", dtype="float32")
    x = norm(x)
    mean = np.asarray(IMAGENET_MEAN_RGB, "float32")
    variance = np.square(np.asarray(IMAGENET_STDDEV_RGB, "float32"))
    # Unadapted, Normalization would be the identity (keras.applications'
    # weights=None case); ImageNet statistics centre from-scratch inputs too.
    norm.set_weights([mean, variance, np.asarray(0, "int64")])
    norm.finalize_state()  # Normalization caches mean/variance; refresh them
    return x


def classifier_head(x, num_classes: int, *, dropout: float = 0.0, pool: bool = True):
    """GAP (unless ``x`` is already pooled), optional dropout, float32 softmax.

    The final Dense runs in float32 (``dtype="float32"``), so probabilities and the
    loss stay float32 under ``mixed_bfloat16`` / ``mixed_float16``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if pool:
        x = layers.GlobalAveragePooling2D(name=POOL_NAME)(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=DROPOUT_NAME)(x)
    return layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=DENSE_KERNEL_INITIALIZER,
        dtype="float32",
        name=CLASSIFIER_NAME,
    )(x)


def is_head_layer(layer) -> bool:
    """True for the pooling, dropout, classifier (and ConvNeXt head LayerNorm)."""
    name = layer.name
    return name in (POOL_NAME, DROPOUT_NAME, CLASSIFIER_NAME) or name.endswith(
        HEAD_SUFFIXES
    )


def sublayers(layer) -> list:
    """Every layer inside ``layer``, depth first (not ``layer`` itself): those of a
    model's ``layers`` and those a composite layer holds as attributes, in lists,
    tuples or dicts (KerasHub's blocks)."""
    found, seen = [], {id(layer)}

    def children(item):
        if isinstance(item, keras.Model):
            return list(item.layers)
        out = []
        for value in vars(item).values():
            values = value.values() if isinstance(value, dict) else value
            if isinstance(values, list | tuple):
                out.extend(v for v in values if isinstance(v, layers.Layer))
            elif isinstance(value, layers.Layer):
                out.append(value)
        return out

    def walk(item):
        for child in children(item):
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                walk(child)

    walk(layer)
    return found
