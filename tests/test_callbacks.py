"""The time budget's estimate of the next epoch, on a fake clock."""

from types import SimpleNamespace

from shopee_tpu import callbacks
from shopee_tpu.callbacks import TimeBudget


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
