"""KerasHub backbones under our head: ``model.backbone=kerashub:PATH_OR_NAME``.

A KerasHub preset is a folder (``config.json``, ``model.weights.h5``,
``image_converter.json``, ...) as published on Kaggle Models; attached to a kernel
it sits under ``/kaggle/input/<model>/keras/<variation>/<version>``, and that path is
what to pass. A preset name (``resnet_50_imagenet``) is resolved by KerasHub itself
through ``kagglehub``, which needs the internet unless the Kaggle Model is attached.

The backbone is built from the preset's config (at our input size) with the
preset's weights, and wrapped like every other registry model: float RGB 0..255 in,
``rescaling`` + ``normalization`` set from the preset's image converter (its
``scale`` and ``offset``; its resize is not used, the pipeline already delivers the
input size), then global average pooling, optional dropout and the float32 softmax
``predictions``. KerasHub is an optional extra: ``pip install "shopee_tpu[hub]"``.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from shopee_tpu.models import layers as common
from shopee_tpu.models.weights import loader, records

PREFIX = "kerashub:"
DEFAULT_SIZE = 224  # when the preset's converter does not resize


class KerasHubError(ValueError):
    """A KerasHub backbone cannot be built; the message says why in one line."""


class KerasHubMissingError(KerasHubError, ImportError):
    """``keras-hub`` is not installed."""


def parse(name: str) -> str | None:
    """The preset of a ``kerashub:PATH_OR_NAME`` registry name, else None."""
    text = str(name).strip()
    if not text.lower().startswith(PREFIX):
        return None
    preset = text[len(PREFIX) :].strip()
    if not preset:
        raise KerasHubError(
            "model.backbone=kerashub: needs a preset folder or name after the colon"
        )
    return os.path.expanduser(preset)


def import_keras_hub():
    try:
        import keras_hub
    except ImportError as e:
        raise KerasHubMissingError(
            f"KerasHub backbones need keras-hub, which is not installed ({e}); "
            'pip install "shopee_tpu[hub]"'
        ) from None
    return keras_hub


def _looks_like_path(preset: str) -> bool:
    return preset.startswith((".", "/", "~")) or os.sep in preset


def _check_local(preset: str) -> None:
    if "://" not in preset and _looks_like_path(preset) and not os.path.isdir(preset):
        raise KerasHubError(
            f"kerashub:{preset}: no such preset folder (on Kaggle, attach the Kaggle "
            "Model and pass /kaggle/input/<model>/keras/<variation>/<version>)"
        )


def _fail(preset: str, what: str, e: Exception) -> KerasHubError:
    text = str(e).strip().splitlines()
    hint = ""
    if not _looks_like_path(preset):
        hint = (
            "; offline, attach the Kaggle Model and pass its folder, "
            "model.backbone=kerashub:/kaggle/input/<model>/keras/<variation>/<version>"
        )
    return KerasHubError(
        f"kerashub:{preset}: could not load the {what} "
        f"({text[0] if text else type(e).__name__}){hint}"
    )


def load_converter(preset: str):
    """The preset's image converter, or None when it has none (a bare backbone)."""
    keras_hub = import_keras_hub()
    _check_local(preset)
    if os.path.isdir(preset) and not os.path.exists(
        os.path.join(preset, "image_converter.json")
    ):
        if os.path.exists(os.path.join(preset, "model.weights.h5")):
            return None  # a Keras-format preset saved without a converter
    try:
        return keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception as e:
        if os.path.isdir(preset) and "image_converter" in str(e):
            return None
        raise _fail(preset, "image converter", e) from e


def native_size(preset: str) -> int:
    """The input side the preset's converter resizes to (224 without one)."""
    converter = load_converter(preset)
    size = getattr(converter, "image_size", None) if converter is not None else None
    return int(size[0]) if size and size[0] else DEFAULT_SIZE


def converter_normalization(converter) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, variance)`` for ``Normalization`` after ``Rescaling(1/255)`` that
    equal the converter's ``x * scale + offset`` on 0..255 pixels."""
    scale = np.broadcast_to(
        np.asarray(1.0 if converter.scale is None else converter.scale, "float64"), (3,)
    )
    offset = np.broadcast_to(
        np.asarray(0.0 if converter.offset is None else converter.offset, "float64"),
        (3,),
    )
    if np.any(scale == 0):
        raise KerasHubError(f"image converter scale {converter.scale}: zero scale")
    std = 1.0 / (255.0 * scale)  # (x/255 - mean) / std == x*scale + offset
    return (-offset * std).astype("float32"), np.square(std).astype("float32")


def load_backbone(preset: str, size: int, *, pretrained: bool = True):
    """The preset's backbone built for ``size`` x ``size`` inputs."""
    keras_hub = import_keras_hub()
    _check_local(preset)
    try:
        with records.socket_timeout(records.DOWNLOAD_TIMEOUT):
            try:
                return keras_hub.models.Backbone.from_preset(
                    preset, load_weights=pretrained, image_shape=(size, size, 3)
                )
            except TypeError:  # a backbone without an image_shape argument
                return keras_hub.models.Backbone.from_preset(
                    preset, load_weights=pretrained
                )
    except Exception as e:
        raise _fail(preset, "backbone", e) from e


def build(
    preset: str,
    num_classes: int,
    *,
    input_size: int | None = None,
    weights: str | None = None,
    weights_preprocessing: str = "auto",
    dropout: float = 0.0,
    include_top: bool = True,
    batchnorm_momentum: float | None = None,
    pretrained: bool = True,
) -> keras.Model:
    """A KerasHub preset's backbone with our input contract and head.

    Args:
        preset: A local preset folder, or a name KerasHub resolves.
        num_classes: Classifier outputs.
        input_size: Square input side; ``None`` uses the converter's size.
        weights: ``None`` (the preset's weights) or a run folder / weights file to
            load on top (e.g. a run trained with this backbone).
        weights_preprocessing: ``auto`` (the preset's converter), ``imagenet`` or
            ``advprop``.
        dropout: Dropout before the classifier.
        include_top: ``False`` returns the pooled features.
        batchnorm_momentum: Set on every BatchNormalization layer when given.
        pretrained: ``False`` builds the architecture only (before loading a run's
            own weights).

    Raises:
        KerasHubError: keras-hub is missing, or the preset cannot be read.
    """
    loader.check_preprocessing(weights_preprocessing)
    converter = _checked_converter(preset, weights, weights_preprocessing)
    size = int(input_size or native_size(preset))
    backbone = load_backbone(preset, size, pretrained=pretrained)
    if batchnorm_momentum is not None:
        for layer in common.sublayers(backbone):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = batchnorm_momentum
    model = _assemble(
        preset, backbone, converter, size, num_classes, dropout, include_top
    )
    loader.set_preprocessing(model, weights_preprocessing)
    if weights is not None and pretrained:
        loader.load_weights(model, weights, preprocessing=weights_preprocessing)
    return model


def _checked_converter(preset: str, weights, weights_preprocessing: str):
    """The preset's image converter, once ``weights`` and the preprocessing are
    known to suit a KerasHub preset."""
    if weights == "imagenet":
        raise KerasHubError(
            f"kerashub:{preset}: the preset carries its own weights; leave "
            "model.weights unset (or pass a run folder trained with this backbone)"
        )
    converter = load_converter(preset)
    if converter is None and weights_preprocessing == "auto":
        raise KerasHubError(
            f"kerashub:{preset}: the preset has no image converter to say how "
            "pixels are normalised; set model.weights_preprocessing=imagenet or advprop"
        )
    return converter


def _assemble(preset, backbone, converter, size, num_classes, dropout, include_top):
    """0..255 pixels -> rescaling and normalization (from ``converter`` when there
    is one) -> ``backbone`` -> pooling -> our head (unless ``include_top`` is off)."""
    inputs = keras.Input((size, size, 3), name="input_layer")
    # float32 so bfloat16 policies never round raw pixels before normalising.
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescaling", dtype="float32")(inputs)
    norm = keras.layers.Normalization(axis=-1, name="normalization", dtype="float32")
    pooled = _pool(preset, backbone(norm(x)))
    if include_top:
        outputs = common.classifier_head(
            pooled, num_classes, dropout=dropout, pool=False
        )
    else:
        outputs = pooled
    model = keras.Model(inputs, outputs, name=f"kerashub-{backbone.name}")
    if converter is not None:
        mean, var = converter_normalization(converter)
        norm.set_weights([mean, var, np.asarray(0, "int64")])
        norm.finalize_state()
    return model


def _pool(preset: str, features):
    """The backbone's output pooled to one vector per image."""
    rank = len(features.shape)
    if rank == 4:
        return keras.layers.GlobalAveragePooling2D(name=common.POOL_NAME)(features)
    if rank == 3:  # token sequences (ViT-style backbones)
        return keras.layers.GlobalAveragePooling1D(name=common.POOL_NAME)(features)
    if rank == 2:
        return features
    raise KerasHubError(
        f"kerashub:{preset}: backbone output {tuple(features.shape)} is not a "
        "feature map, token sequence or vector"
    )
