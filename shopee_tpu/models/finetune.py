"""Freezing and unfreezing the backbone for two-stage fine-tuning.

The usual recipe with pretrained weights: train only the head for an epoch or two
(``freeze_backbone``), then unfreeze the top of the backbone or all of it
(``unfreeze_backbone``) at a lower learning rate. BatchNorm layers stay frozen on
unfreeze: in Keras 3 a non-trainable BatchNorm also runs in inference mode, so its
ImageNet statistics are not wrecked by small fine-tuning batches.

Keras reads ``trainable`` when it compiles, so compile again after either call.
``prepare_phase`` and ``resume_phase`` do this for the phases of a training run.
"""

from __future__ import annotations

import re

import keras

from shopee_tpu.config import PlanConfig
from shopee_tpu.models import layers as common
from shopee_tpu.run_folder import RunFolder


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


# ---------------------------------------------------------------------------
# The phases of a training run (``training.plan``): what trains in each, and how
# a phase resumes from the run folder's checkpoint.


def prepare_phase(model, frozen: bool, plan: PlanConfig) -> None:
    """Sets what trains in a phase (``frozen``: its backbone is frozen); call
    before compiling.

    Frozen: only the head trains, and every BatchNorm runs in inference mode.
    Unfrozen after a frozen start (fine-tuning): the whole backbone trains, BatchNorm
    only with ``plan.train_batchnorm``; the loop compiles it with the backbone's
    learning rate at ``plan.backbone_lr`` times the schedule's.
    """
    if frozen:
        freeze_backbone(model)
    elif plan.freeze_epochs > 0:
        unfreeze_backbone(model, train_batchnorm=plan.train_batchnorm)


def resume_phase(
    folder: RunFolder,
    model,
    *,
    was_frozen: bool,
    frozen: bool,
    steps: int,
    epoch: int,
) -> None:
    """Loads the checkpoint of ``epoch`` (the run folder's last) into ``model``,
    built for a phase whose backbone is ``frozen`` or not, after the phase of
    ``epoch`` (``was_frozen``).

    The weights always fit (they do not depend on the image size). The optimizer
    state fits only when the trainable set is unchanged; after the frozen phase the
    optimizer starts afresh (the backbone had no slots) at the same step, so the
    learning-rate schedule continues, with its weight average (EMA) started from
    the restored weights.
    """
    if was_frozen == frozen:
        folder.restore(model)
        return
    folder.restore(model, optimizer=False)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    history = folder.history
    iterations = history[-1].get("iterations") if history else None
    optimizer.iterations.assign(int(iterations or epoch * steps))
    if optimizer.use_ema:
        # A new average starts at zero, not at the restored weights, once the
        # step count is past 0. Keras names the average of variable `a/b`
        # `a_b_average` (add_variable_from_reference). A copy: on JAX an average
        # sharing its weight's buffer would be donated twice by the train step.
        slots = {v.name: v for v in optimizer.variables}
        for variable in model.trainable_variables:
            average = slots[variable.path.replace("/", "_") + "_average"]
            average.assign(keras.ops.copy(variable))
