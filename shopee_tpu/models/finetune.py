"""Freezing and unfreezing the backbone for two-stage fine-tuning.

The usual recipe with pretrained weights: train only the head for an epoch or two
(``freeze_backbone``), then unfreeze the top of the backbone or all of it
(``unfreeze_backbone``) at a lower learning rate. BatchNorm layers stay frozen on
unfreeze: in Keras 3 a non-trainable BatchNorm also runs in inference mode, so its
ImageNet statistics are not wrecked by small fine-tuning batches.

Keras reads ``trainable`` when it compiles, so compile again after either call.
"""

from __future__ import annotations

import re

import keras

from shopee_tpu.models import layers as common


def _backbone_layers(model) -> list:
    """Layers that hold weights and are not part of the head, in order; a nested
    backbone (KerasHub) is opened, so fractions and names reach its layers."""
    out = []
    for layer in model.layers:
        if not layer.weights or common.is_head_layer(layer):
            continue
        if isinstance(layer, keras.Model):
            layer.trainable = True  # its layers decide one by one
            out.extend(_backbone_layers(layer))
        else:
            out.append(layer)
    return out


def _set_trainable(layer, trainable: bool, train_batchnorm: bool) -> None:
    if isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
        layer.trainable = False
        return
    layer.trainable = trainable
    if trainable and not train_batchnorm:
        # Composite layers (KerasHub blocks) hold BatchNorm inside: keep it frozen.
        for sub in common.sublayers(layer):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False


def freeze_backbone(model: keras.Model) -> int:
    """Makes every backbone layer non-trainable; the head stays trainable.

    Returns:
        The number of trainable weights left (the head's).
    """
    for layer in _backbone_layers(model):
        _set_trainable(layer, False, False)
    for layer in model.layers:
        if common.is_head_layer(layer):
            layer.trainable = True
    return len(model.trainable_weights)


def unfreeze_backbone(
    model: keras.Model,
    from_block: int | float | str | None = None,
    *,
    train_batchnorm: bool = False,
) -> int:
    """Makes the backbone (or its top part) trainable again; BatchNorm stays frozen.

    Args:
        model: A model from ``shopee_tpu.models``.
        from_block: Where unfreezing starts, in layer order:
            ``None``: the whole backbone;
            a float in (0, 1]: that fraction of the backbone's weighted layers,
            counted from the top (``0.3`` = the last 30 %);
            an int ``n``: the first layer of stage ``n`` (names ``block<n>...``
            for EfficientNet/Xception/V2, ``conv<n>_...`` for ResNet/DenseNet);
            a str: the first layer whose name starts with it (e.g. ``"block6a_"``).
            Layers before the start are frozen.
        train_batchnorm: Also unfreeze BatchNorm layers (off by default).

    Returns:
        The number of trainable weights.

    Raises:
        ValueError: ``from_block`` matches no layer or is out of range.
    """
    layers = _backbone_layers(model)
    start = _start_index(layers, from_block)
    for i, layer in enumerate(layers):
        _set_trainable(layer, i >= start, train_batchnorm)
    for layer in model.layers:
        if common.is_head_layer(layer):
            layer.trainable = True
    return len(model.trainable_weights)


def _start_index(layers: list, from_block) -> int:
    if from_block is None:
        return 0
    if isinstance(from_block, bool):
        raise ValueError(f"from_block={from_block!r}: expected None, int, float or str")
    if isinstance(from_block, float):
        if not 0.0 < from_block <= 1.0:
            raise ValueError(f"from_block fraction {from_block}: expected (0, 1]")
        return len(layers) - max(1, round(len(layers) * from_block))
    if isinstance(from_block, int):
        pattern = re.compile(rf"^(?:block|conv){from_block}(?:[a-z]|_)")
        match = lambda name: bool(pattern.match(name))  # noqa: E731
    elif isinstance(from_block, str):
        match = lambda name: name.startswith(from_block)  # noqa: E731
    else:
        raise ValueError(f"from_block={from_block!r}: expected None, int, float or str")
    for i, layer in enumerate(layers):
        if match(layer.name):
            return i
    raise ValueError(
        f"from_block={from_block!r} matches no backbone layer (first names: "
        f"{[layer.name for layer in layers[:4]]})"
    )
