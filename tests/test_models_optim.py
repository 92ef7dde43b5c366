"""The compile recipe: schedules equal their formulas, optimizers, one real step."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from shopee_tpu.config import OptimConfig, RunConfig
from shopee_tpu.models import compile_model, make_optimizer, make_schedule


def _lr(schedule, step) -> float:
    return float(np.asarray(schedule(step)))


def _kaggle_lrfn(epoch, start, peak, low, ramp, sustain, decay):
    """The per-epoch function of the Kaggle TPU notebooks, verbatim."""
    if epoch < ramp:
        return (peak - start) / ramp * epoch + start
    if epoch < ramp + sustain:
        return peak
    return (peak - low) * decay ** (epoch - ramp - sustain) + low


def test_ramp_schedule_equals_kaggle_formula():
    optim = OptimConfig(
        schedule="ramp",
        learning_rate=5e-5,
        scale_lr=True,
        lr_start=1e-5,
        lr_min=1e-5,
        warmup_epochs=5,
        sustain_epochs=2,
        decay=0.8,
    )
    spe, replicas = 10, 8
    schedule = make_schedule(optim, spe, 15, replicas)
    for step in (0, 7, 10, 49, 50, 55, 69, 70, 71, 100, 149):
        want = _kaggle_lrfn(step / spe, 1e-5, 5e-5 * 8, 1e-5, 5, 2, 0.8)
        assert _lr(schedule, step) == pytest.approx(want, rel=1e-5), step
    # At each epoch start it is the per-epoch value used by LearningRateScheduler.
    assert _lr(schedule, 30) == pytest.approx(
        _kaggle_lrfn(3, 1e-5, 4e-4, 1e-5, 5, 2, 0.8)
    )


def test_warmup_cosine_schedule():
    optim = OptimConfig(
        schedule="cosine",
        learning_rate=3e-3,
        warmup_epochs=1,
        lr_start=1e-4,
        lr_min=1e-5,
    )
    spe, epochs = 20, 8
    schedule = make_schedule(optim, spe, epochs)
    total, warm = spe * epochs, spe
    assert _lr(schedule, 0) == pytest.approx(1e-4)
    assert _lr(schedule, 10) == pytest.approx(1e-4 + (3e-3 - 1e-4) * 0.5, rel=1e-5)
    assert _lr(schedule, warm) == pytest.approx(3e-3, rel=1e-5)
    for step in (30, 90, 150):
        progress = (step - warm) / (total - warm)
        want = 1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * progress))
        assert _lr(schedule, step) == pytest.approx(want, rel=1e-4), step
    assert _lr(schedule, total) == pytest.approx(1e-5, rel=1e-4)
    assert _lr(schedule, total + 50) == pytest.approx(1e-5, rel=1e-4)


def test_cdiscount_step_schedule():
    optim = RunConfig.preset("cdiscount").optim
    spe = 7
    schedule = make_schedule(optim, spe, 15)
    # 1-based epochs 1-10 -> 1e-4, 11-13 -> 2e-5, after -> 4e-6.
    for epoch_1based, want in [
        (1, 1e-4),
        (10, 1e-4),
        (11, 2e-5),
        (13, 2e-5),
        (14, 4e-6),
        (15, 4e-6),
    ]:
        first, last = (epoch_1based - 1) * spe, epoch_1based * spe - 1
        assert _lr(schedule, first) == pytest.approx(want), epoch_1based
        assert _lr(schedule, last) == pytest.approx(want), epoch_1based
    scaled = make_schedule(optim.replace(scale_lr=True), spe, 15, replicas=4)
    assert _lr(scaled, 0) == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="step_values"):
        make_schedule(optim.replace(step_values=(1e-4,)), spe, 15)


def test_constant_schedule_and_scaling():
    schedule = make_schedule(
        OptimConfig(schedule="constant", learning_rate=2e-3), 5, 3, 8
    )
    assert _lr(schedule, 0) == _lr(schedule, 999) == pytest.approx(2e-3)  # scale_lr off
    scaled = make_schedule(
        OptimConfig(schedule="constant", learning_rate=2e-3, scale_lr=True), 5, 3, 8
    )
    assert _lr(scaled, 3) == pytest.approx(1.6e-2)
    with pytest.raises(ValueError, match="optim.schedule 'linear'"):
        make_schedule(OptimConfig(schedule="linear"), 5, 3)


@pytest.mark.parametrize("kind", ["constant", "ramp", "cosine", "step"])
def test_schedules_serialise(kind):
    schedule = make_schedule(OptimConfig(schedule=kind), 11, 6, 2)
    blob = json.dumps(keras.optimizers.schedules.serialize(schedule))
    again = keras.optimizers.schedules.deserialize(json.loads(blob))
    assert type(again) is type(schedule)
    for step in (0, 5, 11, 40, 66):
        assert _lr(again, step) == pytest.approx(_lr(schedule, step))


def test_optimizers_from_config():
    lr = 1e-3
    assert isinstance(
        make_optimizer(OptimConfig(optimizer="adam"), lr), keras.optimizers.Adam
    )
    adamw = make_optimizer(OptimConfig(optimizer="adamw", weight_decay=0.01), lr)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.01
    assert isinstance(
        make_optimizer(OptimConfig(optimizer="nadam"), lr), keras.optimizers.Nadam
    )
    sgd = make_optimizer(OptimConfig(optimizer="sgd", momentum=0.8, clipnorm=1.0), lr)
    assert (
        isinstance(sgd, keras.optimizers.SGD)
        and sgd.momentum == 0.8
        and sgd.clipnorm == 1.0
    )
    ema = make_optimizer(OptimConfig(ema=True, ema_momentum=0.95), lr)
    assert ema.use_ema and ema.ema_momentum == 0.95
    with pytest.raises(ValueError, match="optim.optimizer 'rmsprop'"):
        make_optimizer(OptimConfig(optimizer="rmsprop"), lr)


def test_compile_and_train_one_step():
    optim = OptimConfig(
        optimizer="nadam",
        schedule="cosine",
        learning_rate=1e-2,
        label_smoothing=0.2,
        steps_per_execution=2,
        weight_decay=1e-4,
    )
    # A two-layer model: this tests the recipe's plumbing, not a backbone (whose
    # first TF trace alone takes 10-20 s on a busy 2-core machine).
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    compile_model(model, optim, steps_per_epoch=4, epochs=2)
    assert model.loss.get_config()["label_smoothing"] == 0.2
    assert model.steps_per_execution == 2
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    before = model.get_layer("stem_conv").get_weights()[0].copy()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 <= logs["accuracy"] <= 1.0
    assert int(model.optimizer.iterations) == 1
    assert not np.allclose(before, model.get_layer("stem_conv").get_weights()[0])
    # The optimizer reads the same schedule the run folder plots.
    assert float(model.optimizer.learning_rate) == pytest.approx(
        _lr(make_schedule(optim, 4, 2), 1), rel=1e-5
    )


# One SGD weight whose loss is minus itself: each step adds exactly the learning
# rate the compiled step used, so the weight's moves read the schedule back.
_PLANNED_TOTAL = """
import keras, numpy as np
from shopee_tpu.config import OptimConfig
from shopee_tpu.models import make_optimizer, make_schedule
from shopee_tpu.models.optim import planned_steps

optim = OptimConfig(optimizer="sgd", momentum=0.0, schedule="cosine",
                    learning_rate=1.0, warmup_epochs=0, lr_min=0.0)
model = keras.Sequential([keras.Input((1,)),
                          keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
model.compile(optimizer=make_optimizer(optim, make_schedule(optim, 1, 10)),
              loss=lambda y, p: -keras.ops.mean(p))
x = y = np.ones((1, 1), "float32")
w = lambda: float(model.layers[0].get_weights()[0][0, 0])
moves = []
for step in range(4):
    if step == 3:  # planned down from 10 steps to 4, between two calls
        planned_steps(model.optimizer).assign(4.0)
    before = w()
    model.train_on_batch(x, y)
    moves.append(w() - before)
print("MOVES", moves, len(model.optimizer.variables))
"""


def _planned_moves(stdout: str) -> list[float]:
    line = next(x for x in stdout.splitlines() if x.startswith("MOVES"))
    return json.loads(line.split(" ", 1)[1].rsplit("]", 1)[0] + "]")


def _check_planned_moves(moves: list[float]) -> None:
    cosine = lambda s, total: 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    assert moves[:3] == pytest.approx([cosine(s, 10) for s in range(3)], rel=1e-5)
    # The fourth step ran at the end of a 4-step cosine, not at 3/10 of a 10-step one.
    assert moves[3] == pytest.approx(cosine(3, 4), rel=1e-5)
    assert moves[3] != pytest.approx(cosine(3, 10), rel=1e-2)


def test_the_compiled_step_reads_the_planned_end_of_the_cosine(capsys):
    exec(_PLANNED_TOTAL, {})  # TensorFlow, in this process
    _check_planned_moves(_planned_moves(capsys.readouterr().out))


@pytest.mark.slow
def test_the_jitted_jax_step_reads_the_planned_end_of_the_cosine():
    from conftest import run_python

    out = run_python(_PLANNED_TOTAL, env={"KERAS_BACKEND": "jax"}, timeout=300)
    _check_planned_moves(_planned_moves(out))
