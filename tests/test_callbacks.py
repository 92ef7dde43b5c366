"""The time budget's estimate of the next epoch and when epochs are committed, on a
fake clock."""

from types import SimpleNamespace

import keras
import numpy as np

from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training import callbacks
from shopee_tpu.training.callbacks import EpochCommit, TimeBudget


def _epochs(budget, clock, durations):
    """Runs epochs of the given durations; returns how many ran before the stop."""
    for i, took in enumerate(durations):
        budget.on_epoch_begin(i)
        clock.now += took
        budget.on_epoch_end(i)
        if budget.model.stop_training:
            return i + 1
    return len(durations)


def test_the_traced_first_epoch_of_a_fit_does_not_stand_for_the_next(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock.now)
    budget = TimeBudget(SimpleNamespace(epoch=1), start=0.0, limit=90.0)
    budget.set_model(SimpleNamespace(stop_training=False))
    # A 40 s traced epoch, then 10 s epochs. At 50 s the next epoch is estimated
    # at 10 s, not 40 s (50 + 44 > 90), so training goes on until 80 s (+11 > 90).
    budget.on_train_begin()
    assert _epochs(budget, clock, [40, 10, 10, 10, 10, 10]) == 5
    assert budget.longest == 10 and "80s used" in budget.reason
    # A new fit (the next phase) traces again; its first epoch does not raise the
    # steady estimate.
    budget = TimeBudget(SimpleNamespace(epoch=1), start=0.0, limit=1000.0)
    budget.set_model(SimpleNamespace(stop_training=False))
    clock.now = 0.0
    for durations in ([40, 10], [60, 15]):
        budget.on_train_begin()
        _epochs(budget, clock, durations)
    assert budget.longest == 15 and budget.first == 60
    # Before any steady epoch, the traced one is all there is to go by.
    budget = TimeBudget(SimpleNamespace(epoch=1), start=clock.now, limit=30.0)
    budget.set_model(SimpleNamespace(stop_training=False))
    budget.on_train_begin()
    assert _epochs(budget, clock, [20, 5]) == 1 and budget.longest == 20


class _Clock(keras.callbacks.Callback):
    """Advances the fake clock by a fixed time per training step."""

    def __init__(self, clock, per_step):
        super().__init__()
        self.clock, self.per_step = clock, per_step

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += self.per_step


def _commit_run(tmp_path, monkeypatch, *, every, epochs, fits=1, monitor=None):
    """Fits a tiny model with EpochCommit on a fake clock (5 s an epoch); returns
    the run folder and the epochs committed, one list per commit."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock.now)
    run = RunFolder(tmp_path / "run")
    commits = []
    real_commit = run.commit_epoch

    def spy(model, epoch, row, *, earlier=(), **kw):
        commits.append([r["epoch"] for r in [*earlier, row]])
        return real_commit(model, epoch, row, earlier=earlier, **kw)

    run.commit_epoch = spy
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(20) % 2]
    commit = EpochCommit(run, 5, 4, 0.01, write=True, monitor=monitor, every=every)
    done = 0
    for end in np.linspace(epochs / fits, epochs, fits).astype(int):
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=int(end),
            initial_epoch=done,
            validation_data=(x, y) if monitor else None,
            callbacks=[_Clock(clock, 1.0), commit],
            verbose=0,
        )
        done = int(end)
    return RunFolder(tmp_path / "run"), commits


def test_epochs_are_committed_every_so_often_and_at_the_end_of_each_fit(
    tmp_path, monkeypatch
):
    # 5 s epochs, a commit due every 12 s: epochs 3 (15 s), 6 (30 s), then the
    # end of the fit at epoch 7. Every epoch's row reaches the history.
    run, commits = _commit_run(tmp_path, monkeypatch, every=12, epochs=7)
    assert commits == [[1, 2, 3], [4, 5, 6], [7]]
    assert run.epoch == 7 and [r["epoch"] for r in run.history] == list(range(1, 8))
    assert run.state["best"]["epoch"] == 7  # no monitor: the latest epoch
    # Two fits (two phases): each one's end commits.
    run, commits = _commit_run(tmp_path / "b", monkeypatch, every=100, epochs=6, fits=2)
    assert commits == [[1, 2, 3], [4, 5, 6]] and run.epoch == 6
    # every=0: each epoch.
    _, commits = _commit_run(tmp_path / "c", monkeypatch, every=0, epochs=3)
    assert commits == [[1], [2], [3]]


def test_a_new_best_epoch_is_committed_at_once(tmp_path, monkeypatch):
    run, commits = _commit_run(
        tmp_path, monkeypatch, every=1000, epochs=8, monitor="val_accuracy"
    )
    values = [r["val_accuracy"] for r in run.history]
    # No commit is due by the clock: each one before the fit's end is at an epoch
    # that beat every earlier one, starting with the first.
    assert commits[0] == [1] and commits[-1][-1] == 8
    for group in commits[:-1]:
        epoch = group[-1]
        assert values[epoch - 1] > max(values[: epoch - 1], default=-1.0)
    assert sum(map(len, commits)) == 8 and run.state["best"]["value"] == max(values)


def test_mid_epoch_the_limit_is_agreed_on_every_few_seconds_not_every_step(
    monkeypatch,
):
    """On several hosts each check is a broadcast from the chief: 10 ms steps for
    20 s make 2,000 steps, and the chief's clock is asked about every 5 s."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock.now)
    asked = []

    def agree(value):
        asked.append((clock.now, value))
        return value

    budget = TimeBudget(SimpleNamespace(epoch=1), start=0.0, limit=15.0, agree=agree)
    budget.set_model(SimpleNamespace(stop_training=False))
    budget.on_train_begin()
    steps = 0
    while not budget.model.stop_training and steps < 2000:
        clock.now += 0.01
        steps += 1
        budget.on_train_batch_end(steps - 1)
    assert len(asked) <= 5  # at 0.01 s, then about every 5 s
    gaps = np.diff([t for t, _ in asked[1:]])
    assert (np.abs(gaps - TimeBudget.CHECK_EVERY) < 0.1).all(), asked
    # It stopped at the first check after the limit, at most 5 s late.
    assert asked[-1][1] < 0 and 15.0 < clock.now <= 15.0 + TimeBudget.CHECK_EVERY
    assert "reached mid-epoch" in budget.reason
