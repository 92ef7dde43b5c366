"""A time limit plans the schedule to fit: the epoch count from the measured
epochs, the end of the cosine with it, a killed run resuming on the same plan, and
every process taking the chief's plan. Runs on a fake clock that advances one
second per training step, so the plan is the same on any machine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import keras
import pandas as pd
import pytest
from conftest import TINY

from shopee_tpu.config import PlanConfig, RunConfig
from shopee_tpu.training import callbacks, loop, report, time_plan
from shopee_tpu.training.plan import Phase, phase_at, plan_phases
from shopee_tpu.training.time_plan import FitToTime, epochs_that_fit

STEPS = 4  # steps an epoch: 4 seconds of the fake clock


class _FakeTime:
    """The ``time`` module with a ``monotonic`` that only the steps advance."""

    def __init__(self):
        import time

        self.now, self._real = 1000.0, time

    def monotonic(self):
        return self.now

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Tick(keras.callbacks.Callback):
    """One second per training step; raises after ``kill_after`` epochs (a kill:
    nothing after it runs, the epochs already committed stay)."""

    def __init__(self, clock, kill_after=None):
        super().__init__()
        self.clock, self.kill_after = clock, kill_after

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += 1.0

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.kill_after:
            raise KeyboardInterrupt("killed")


@pytest.fixture
def clock(monkeypatch):
    fake = _FakeTime()
    for module in (loop, callbacks, time_plan, report):
        monkeypatch.setattr(module, "time", fake)
    return fake


def _config(records, out):
    return RunConfig.preset("demo").override(
        f"data.train={records['train']}",
        f"out_dir={out}",
        *TINY,
        "batch_size=16",
        "epochs=30",
        f"steps_per_epoch={STEPS}",
        "optim.warmup_epochs=0.5",
        "data.valid_fraction=0",  # the plan needs no validation, nor its report
    )


def _cosine_lr(cfg, step: int, epochs: int) -> float:
    """The warm-up cosine of ``cfg`` over ``epochs`` epochs, at ``step``."""
    o, warm = cfg.optim, round(cfg.optim.warmup_epochs * STEPS)
    progress = min(1.0, (step - warm) / (epochs * STEPS - warm))
    return o.lr_min + 0.5 * (o.learning_rate - o.lr_min) * (
        1 + math.cos(math.pi * progress)
    )


def test_the_plan_cuts_the_phases_again_and_never_goes_back():
    plan = PlanConfig(sizes=(32, 48), resize_fraction=0.5)
    by_size = {32: 1.0, 48: 2.25, 64: 4.0}  # seconds: by pixel count

    def fit(done, available, current):
        return epochs_that_fit(
            plan,
            64,
            done=done,
            most=40,
            available=available,
            seconds=lambda p: by_size[p.image_size],
            current=current,
        )

    # 20 epochs: 5 at 32 px, 5 at 48, 10 at 64, the last with TimeBudget's 10 %
    # margin: 5 + 11.25 + 9 * 4 + 4.4 = 56.65 s.
    assert fit(0, 56.65, Phase(0, 20, 32)) == 20
    assert fit(0, 56.6, Phase(0, 20, 32)) == 19
    # After 12 epochs at 48 px, 80 s hold a plan of 34 (epoch 13 still at 48 px).
    assert fit(12, 80.0, Phase(10, 20, 48)) == 34
    # At 64 px already, no plan goes back to 48: any count over 25 would.
    assert fit(12, 1000.0, Phase(12, 40, 64)) == 25
    assert phase_at(plan_phases(plan, 26, 64), 12).image_size == 48
    assert fit(3, 0.5, Phase(0, 20, 32)) == 3  # nothing more fits


def _run(records, out, clock, *, limit, kill_after=None, **kw):
    from shopee_tpu.training import train

    return train(
        _config(records, out),
        time_limit=limit,
        checkpoint_every=0,
        verbose=0,
        callbacks=[_Tick(clock, kill_after)],
        **kw,
    )


@pytest.mark.slow
def test_a_time_limit_ends_the_cosine_with_the_last_epoch_that_fits(
    digits_records, tmp_path, clock
):
    # 4 s epochs, 5 s kept for the report: at 8 s (2 epochs) 45.5 - 8 - 5 = 32.5 s
    # hold 8 more epochs (the last with TimeBudget's 10 % margin: 7 * 4 + 4.4), so
    # 10 of the 30 asked.
    cfg = _config(digits_records, tmp_path / "run")
    result = _run(digits_records, tmp_path / "run", clock, limit=45.5)
    # The optimizer's schedule ended with the last epoch (without a plan it ran
    # to 120 steps, and the time limit cut it after 44, at 0.72 of the peak).
    optimizer = result.model.optimizer
    assert float(optimizer.learning_rate) == pytest.approx(cfg.optim.lr_min)
    assert int(optimizer.iterations) == 10 * STEPS
    m = result.metrics
    assert (m["epochs_completed"], m["epochs"], m["epochs_asked"]) == (10, 10, 30)
    assert m["finished"] and m["stop_reason"] is None
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    after_plan = history[history.epoch > 2]
    want = [_cosine_lr(cfg, i - 1, 10) for i in after_plan.iterations]
    assert after_plan.lr.tolist() == pytest.approx(want, rel=1e-4)

    # Killed after epoch 6 (the plan was committed at epoch 2), then resumed with
    # no limit at all: it finishes the same 10 epochs on the same schedule.
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _run(digits_records, killed, clock, limit=45.5, kill_after=6)
    resumed = _run(digits_records, killed, clock, limit=None)
    assert resumed.metrics["epochs_completed"] == 10 and resumed.metrics["finished"]
    again = pd.read_csv(killed / "history.csv")
    assert again.iterations.tolist() == history.iterations.tolist()
    assert again.lr.tolist() == pytest.approx(history.lr.tolist(), rel=1e-6)
    assert float(resumed.model.optimizer.learning_rate) == pytest.approx(
        cfg.optim.lr_min
    )

    # A run spread over sessions (--resume-later): the limit only stops it, after
    # 11 epochs (at 44 s the next would end past 45.5), every epoch still to come.
    later = _run(
        digits_records, tmp_path / "later", clock, limit=45.5, fit_to_time=False
    )
    m = later.metrics
    assert (m["epochs_completed"], m["epochs"], m["finished"]) == (11, 30, False)


def _fake_run(start: float):
    cfg = RunConfig.preset("smoke").override("epochs=30")
    folder = SimpleNamespace(planned_epochs=None, plan_epochs=lambda e: None)
    acc = SimpleNamespace(batch_size=lambda b: b, replicas=1)
    return SimpleNamespace(
        config=cfg, folder=folder, acc=acc, phases=[Phase(0, 30, 32)],
        image_size=32, steps=10, start=start, n_valid=0, say=lambda text: None,
    )  # fmt: skip


def test_every_process_takes_the_chiefs_plan(monkeypatch):
    """Two processes whose clocks disagree (the second's epochs look three times
    longer) both plan the chief's count, at the same epoch."""
    clocks, chief = [_FakeTime(), _FakeTime()], {}

    def agree(index):
        def from_chief(value):  # as Accelerator.from_chief: process 0's value
            if index == 0:
                chief["value"] = value
            return chief["value"]

        return from_chief

    def on(index, hook, *args):  # runs a hook on process ``index``'s clock
        monkeypatch.setattr(time_plan, "time", clocks[index])
        hook(*args)

    plans = []
    for index in range(2):
        plan = FitToTime(_fake_run(clocks[index].now), 200.0, agree=agree(index))
        plan.set_model(SimpleNamespace(stop_training=False, optimizer=None))
        on(index, plan.on_train_begin)
        plans.append(plan)
    for epoch in range(2):
        for index, plan in enumerate(plans):  # in step, as the collective keeps them
            on(index, plan.on_epoch_begin, epoch)
            clocks[index].now += 10.0 * (1 + 2 * index)
            on(index, plan.on_epoch_end, epoch)
    # The chief: 20 s used, 5 s kept, 175 s hold 17 more 10-s epochs: 19. Alone,
    # the second process would have planned 6.
    assert [p.run.config.epochs for p in plans] == [19, 19]
    assert [p.run.phases for p in plans] == [[Phase(0, 19, 32)]] * 2
