"""The compile recipe: optimizer, per-step learning-rate schedule, loss and metric,
all taken from an ``OptimConfig``.

Schedules are ``keras.optimizers.schedules.LearningRateSchedule`` objects evaluated
per optimizer step, so a resumed run (the optimizer's iteration count restored from
the checkpoint) lands on the same learning rate. Each one serialises with
``get_config`` and is written in ``keras.ops``, so it runs on TensorFlow and JAX.

Learning-rate scaling with replicas (``optim.scale_lr``) multiplies the peak rate
(``learning_rate``) and the ``step`` values; ``lr_start`` and ``lr_min`` stay as
given (the Kaggle recipe scales only ``LR_MAX``).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import keras
from keras import ops

from shopee_tpu.config import OptimConfig
from shopee_tpu.models.layers import is_head_layer

OPTIMIZERS = ("adam", "adamw", "nadam", "sgd")
SCHEDULES = ("constant", "ramp", "cosine", "step")
# Never decay these: BatchNorm/LayerNorm scales and shifts, and biases.
NO_DECAY = ["bias", "gamma", "beta"]

_Base = keras.optimizers.schedules.LearningRateSchedule


def _epoch(step, steps_per_epoch: int):
    return ops.cast(step, "float32") / float(steps_per_epoch)


@keras.saving.register_keras_serializable(package="shopee_tpu")
class ConstantSchedule(_Base):
    """The same learning rate at every step."""

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return ops.cast(step, "float32") * 0.0 + self.learning_rate

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="shopee_tpu")
class RampSchedule(_Base):
    """The Kaggle TPU-notebook schedule: linear ramp-up, sustain, exponential decay.

    The per-epoch formula, evaluated at the fractional epoch ``step /
    steps_per_epoch`` (so it moves every step, and equals the per-epoch version at
    each epoch start)::

        e < ramp:           lr_start + (lr_max - lr_start) * e / ramp
        e < ramp + sustain: lr_max
        otherwise:          (lr_max - lr_min) * decay ** (e - ramp - sustain) + lr_min
    """

    def __init__(
        self,
        steps_per_epoch: int,
        lr_start: float,
        lr_max: float,
        lr_min: float,
        ramp_epochs: float,
        sustain_epochs: float,
        decay: float,
    ):
        self.steps_per_epoch = int(steps_per_epoch)
        self.lr_start, self.lr_max, self.lr_min = (
            float(lr_start),
            float(lr_max),
            float(lr_min),
        )
        self.ramp_epochs, self.sustain_epochs = (
            float(ramp_epochs),
            float(sustain_epochs),
        )
        self.decay = float(decay)

    def __call__(self, step):
        e = _epoch(step, self.steps_per_epoch)
        hold = self.ramp_epochs + self.sustain_epochs
        # Clamp the exponent so the branch not taken cannot overflow.
        decayed = (self.lr_max - self.lr_min) * ops.power(
            self.decay, ops.maximum(e - hold, 0.0)
        ) + self.lr_min
        lr = ops.where(e < hold, self.lr_max, decayed)
        if self.ramp_epochs > 0:
            ramp = self.lr_start + (self.lr_max - self.lr_start) * e / self.ramp_epochs
            lr = ops.where(e < self.ramp_epochs, ramp, lr)
        return lr

    def get_config(self):
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "lr_start": self.lr_start,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
            "ramp_epochs": self.ramp_epochs,
            "sustain_epochs": self.sustain_epochs,
            "decay": self.decay,
        }


@keras.saving.register_keras_serializable(package="shopee_tpu")
class WarmupCosineSchedule(_Base):
    """Linear warmup from ``lr_start`` to ``lr_max`` over ``warmup_steps``, then a
    half cosine from ``lr_max`` down to ``lr_min`` at ``total_steps`` (held after).

    Its end can move while training: an optimizer from ``make_optimizer`` owns a
    ``planned_steps`` variable, created with ``total_steps``, and the schedule
    reads its end from it (``planned``). A time limit that plans fewer epochs
    (``shopee_tpu.training.time_plan``) assigns it; the compiled step reads the
    new value at its next call, on TensorFlow and JAX alike (an optimizer
    variable is part of the state JAX's step is handed), with no retrace, and a
    checkpoint carries it with the rest of the optimizer state.
    """

    def __init__(
        self,
        warmup_steps: int,
        total_steps: int,
        lr_start: float,
        lr_max: float,
        lr_min: float,
    ):
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.lr_start, self.lr_max, self.lr_min = (
            float(lr_start),
            float(lr_max),
            float(lr_min),
        )
        self.planned = None  # the optimizer's variable, once bound

    def __call__(self, step):
        s = ops.cast(step, "float32")
        total = self.total_steps if self.planned is None else self.planned
        span = ops.maximum(ops.cast(total, "float32") - self.warmup_steps, 1.0)
        progress = ops.clip((s - self.warmup_steps) / span, 0.0, 1.0)
        cosine = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (
            1.0 + ops.cos(math.pi * progress)
        )
        if self.warmup_steps <= 0:
            return cosine
        warm = self.lr_start + (self.lr_max - self.lr_start) * s / self.warmup_steps
        return ops.where(s < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "lr_start": self.lr_start,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }


@keras.saving.register_keras_serializable(package="shopee_tpu")
class StepSchedule(_Base):
    """Piecewise constant by (0-based) epoch: ``values[i]`` until ``boundaries[i]``.

    The Cdiscount 3rd place: boundaries ``(10, 13)``, values ``(1e-4, 2e-5, 4e-6)``
    = 1e-4 for epochs 1-10, 2e-5 for 11-13 and 4e-6 after (1-based epochs).
    """

    def __init__(self, steps_per_epoch: int, boundaries, values):
        boundaries, values = [float(b) for b in boundaries], [float(v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"optim.step_values needs one more value than optim.step_epochs has "
                f"boundaries; got {len(values)} values for {len(boundaries)} boundaries"
            )
        if boundaries != sorted(boundaries):
            raise ValueError(f"optim.step_epochs must increase, got {boundaries}")
        self.steps_per_epoch, self.boundaries, self.values = (
            int(steps_per_epoch),
            boundaries,
            values,
        )

    def __call__(self, step):
        epoch = ops.floor(_epoch(step, self.steps_per_epoch))
        lr = ops.zeros_like(epoch) + self.values[0]
        for boundary, value in zip(self.boundaries, self.values[1:]):
            lr = ops.where(epoch >= boundary, value, lr)
        return lr

    def get_config(self):
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "boundaries": list(self.boundaries),
            "values": list(self.values),
        }


def make_schedule(
    optim: OptimConfig, steps_per_epoch: int, epochs: int, replicas: int = 1
) -> _Base:
    """The learning-rate schedule an ``OptimConfig`` describes, per optimizer step.

    Args:
        optim: ``schedule`` picks ``constant``, ``ramp``, ``cosine`` or ``step``;
            the other fields give its shape (see ``OptimConfig``).
        steps_per_epoch: Optimizer steps in one epoch.
        epochs: Planned epochs (the end of the cosine).
        replicas: Model replicas; multiplies the peak rate when ``optim.scale_lr``.

    Raises:
        ValueError: unknown schedule name or inconsistent values (names the field).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    scale = float(replicas) if optim.scale_lr else 1.0
    peak = optim.learning_rate * scale
    kind = optim.schedule.lower()
    if kind == "constant":
        return ConstantSchedule(peak)
    if kind == "ramp":
        return RampSchedule(
            steps_per_epoch,
            optim.lr_start,
            peak,
            optim.lr_min,
            optim.warmup_epochs,
            optim.sustain_epochs,
            optim.decay,
        )
    if kind == "cosine":
        return WarmupCosineSchedule(
            round(optim.warmup_epochs * steps_per_epoch),
            steps_per_epoch * epochs,
            optim.lr_start,
            peak,
            optim.lr_min,
        )
    if kind == "step":
        values = [v * scale for v in optim.step_values]
        return StepSchedule(steps_per_epoch, optim.step_epochs, values)
    raise ValueError(f"optim.schedule {optim.schedule!r}: expected one of {SCHEDULES}")


def make_optimizer(
    optim: OptimConfig,
    learning_rate,
    *,
    backbone_lr: float = 1.0,
    head: Collection[str] = (),
) -> keras.optimizers.Optimizer:
    """Adam, AdamW, Nadam or SGD (with ``optim.momentum``) as ``optim`` says.

    ``weight_decay`` is Keras' decoupled decay for every optimizer (biases and
    normalisation scales/shifts excluded); ``ema`` keeps an exponential moving
    average of the weights (swap it in with ``keras.callbacks.SwapEMAWeights``);
    ``clipnorm`` > 0 clips each gradient by norm.

    ``backbone_lr`` != 1 steps every variable outside ``head`` (variable paths,
    e.g. ``predictions/kernel``) at that times the learning rate: after a frozen
    warmup the head is trained already, and the backbone must move gently to keep
    what its pretrained weights learned. It is applied in ``update_step``, which
    every Keras optimizer calls once per variable on every backend; the decoupled
    weight decay, applied before it, is not scaled.
    """
    kw: dict = {"learning_rate": learning_rate}
    if optim.clipnorm > 0:
        kw["clipnorm"] = optim.clipnorm
    if optim.ema:
        kw.update(use_ema=True, ema_momentum=optim.ema_momentum)
    decay = optim.weight_decay or None
    kind = optim.optimizer.lower()
    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "nadam": keras.optimizers.Nadam,
        "sgd": keras.optimizers.SGD,
    }
    if kind not in classes:
        raise ValueError(
            f"optim.optimizer {optim.optimizer!r}: expected one of {OPTIMIZERS}"
        )
    cls = classes[kind]
    if backbone_lr != 1.0:
        cls = _backbone_scaled(cls, frozenset(head), float(backbone_lr))
    if isinstance(learning_rate, WarmupCosineSchedule):
        cls = _planned_total(cls, learning_rate)
    if kind == "adamw":
        kw["weight_decay"] = optim.weight_decay
    else:
        kw["weight_decay"] = decay
    if kind == "sgd":
        kw["momentum"] = optim.momentum
    opt = cls(**kw)
    if optim.weight_decay:
        opt.exclude_from_weight_decay(var_names=NO_DECAY)
    return opt


def _backbone_scaled(base: type, head: frozenset, factor: float) -> type:
    """``base`` stepping the variables outside ``head`` at ``factor`` x the rate."""

    class BackboneScaled(base):
        def build(self, variables):
            super().build(variables)
            self.lr_scales = [1.0 if v.path in head else factor for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            scale = self.lr_scales[_variable_index(self, variable)]
            if scale != 1.0:
                learning_rate = learning_rate * scale
            return super().update_step(gradient, variable, learning_rate)

    BackboneScaled.__name__ = base.__name__
    return BackboneScaled


def _planned_total(base: type, schedule: WarmupCosineSchedule) -> type:
    """``base`` owning the variable its cosine ``schedule`` reads its end from."""

    class PlannedTotal(base):
        def build(self, variables):
            super().build(variables)
            self.planned_steps = self.add_variable(
                (),
                initializer=keras.initializers.Constant(schedule.total_steps),
                dtype="float32",
                name="planned_steps",
            )
            schedule.planned = self.planned_steps

    PlannedTotal.__name__ = base.__name__
    return PlannedTotal


def planned_steps(optimizer):
    """The variable holding the optimizer's planned total of steps (the end of
    its cosine schedule), or ``None`` for a schedule without an end."""
    return getattr(optimizer, "planned_steps", None)


def _variable_index(optimizer, variable) -> int:
    """The position in ``optimizer.build``'s list of the variable ``update_step``
    was handed: a Keras variable on JAX, a ``tf.Variable`` (or one replica's copy
    of it) on TensorFlow, so neither its identity nor its name finds it. Keras has
    no public lookup; this is the one it uses for its own slots (checked against
    Keras 3.12 to 3.15)."""
    return optimizer._get_variable_index(variable)


def make_loss(optim: OptimConfig) -> keras.losses.Loss:
    """Categorical cross-entropy on one-hot (or mixed) labels and probabilities."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=optim.label_smoothing)


def compile_model(
    model: keras.Model,
    optim: OptimConfig,
    *,
    steps_per_epoch: int,
    epochs: int,
    replicas: int = 1,
    jit_compile: bool | str = "auto",
    backbone_lr: float = 1.0,
) -> keras.Model:
    """Compiles ``model`` with the recipe in ``optim``.

    Optimizer and schedule as ``make_optimizer`` / ``make_schedule``; loss
    ``CategoricalCrossentropy(label_smoothing)`` on one-hot labels; metric
    ``accuracy`` (categorical, so soft MixUp labels work); ``steps_per_execution``
    from the config (raise it on TPUs). Call it inside the accelerator's scope.
    ``jit_compile="auto"`` leaves XLA off on CPU-only machines, where it is slow.
    ``backbone_lr`` scales the learning rate of everything but the head (see
    ``make_optimizer``).

    Returns:
        The same model, compiled, with its optimizer built.
    """
    schedule = make_schedule(optim, steps_per_epoch, epochs, replicas)
    head = [
        v.path for layer in model.layers if is_head_layer(layer) for v in layer.weights
    ]
    model.compile(
        optimizer=make_optimizer(optim, schedule, backbone_lr=backbone_lr, head=head),
        loss=make_loss(optim),
        # Weighted: padded validation batches give their blank rows weight 0
        # (batches without weights count every row, as plain metrics do).
        weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=max(1, int(optim.steps_per_execution)),
        jit_compile=jit_compile,
    )
    # Built now, eagerly: left to the first training step, the optimizer would
    # create its variables inside the traced function, which TensorFlow then
    # traces a second time (about half the first epoch's cost), and a checkpoint
    # restored before that step would skip the optimizer state.
    model.optimizer.build(model.trainable_variables)
    return model
