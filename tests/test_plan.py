"""The training plan: epochs from the data size, phases, and validation warnings."""

import pytest

from shopee_tpu.config import PlanConfig, RunConfig
from shopee_tpu.training.checks import validation_warnings
from shopee_tpu.training.plan import Phase, phase_at, plan_epochs, plan_phases


def test_epochs_follow_the_data_size_between_the_floor_and_the_cap():
    cfg = RunConfig().replace(
        epochs=60, plan=PlanConfig(images_seen=36000, min_epochs=8)
    )
    assert plan_epochs(cfg, 1200) == 30
    assert plan_epochs(cfg, 100) == 60  # capped by epochs
    assert plan_epochs(cfg, 100_000) == 8  # the floor
    assert plan_epochs(RunConfig().replace(epochs=7), 1200) == 7  # off: as given


def test_one_phase_when_nothing_is_planned():
    assert plan_phases(PlanConfig(), 10, 64) == [Phase(0, 10, 64, False)]


def test_progressive_sizes_share_the_early_epochs_and_full_size_comes_last():
    phases = plan_phases(PlanConfig(sizes=(32, 48), resize_fraction=0.5), 30, 64)
    assert phases == [Phase(0, 8, 32), Phase(8, 15, 48), Phase(15, 30, 64)]
    # Too few epochs for every size: the later size wins, full size keeps >= 1.
    assert plan_phases(PlanConfig(sizes=(32, 48)), 2, 64) == [
        Phase(0, 1, 48),
        Phase(1, 2, 64),
    ]
    assert phase_at(phases, 0).image_size == 32
    assert phase_at(phases, 14).image_size == 48
    assert phase_at(phases, 29) == phase_at(phases, 99) == phases[-1]


def test_frozen_warmup_splits_phases_with_resizing():
    phases = plan_phases(PlanConfig(sizes=(32,), freeze_epochs=2), 8, 64)
    assert phases == [
        Phase(0, 2, 32, True),
        Phase(2, 4, 32, False),
        Phase(4, 8, 64, False),
    ]
    assert plan_phases(PlanConfig(freeze_epochs=5), 3, 64) == [Phase(0, 3, 64, True)]


@pytest.mark.parametrize(
    "plan",
    [PlanConfig(sizes=(64,)), PlanConfig(sizes=(48, 32)), PlanConfig(sizes=(0,))],
)
def test_bad_sizes_are_refused_with_the_field_named(plan):
    with pytest.raises(ValueError, match="plan.sizes"):
        plan_phases(plan, 10, 64)


def _row(epoch, acc, val):
    return {"epoch": epoch, "accuracy": acc, "val_accuracy": val}


def test_validation_at_the_ceiling_warns():
    (message,) = validation_warnings([_row(1, 0.8, 0.9), _row(2, 0.95, 0.997)])
    assert "0.9970" in message and "group" in message


def test_validation_far_above_training_warns_unless_mixing():
    history = [_row(1, 0.3, 0.5), _row(2, 0.6, 0.85)]
    (message,) = validation_warnings(history)
    assert "exceeds training accuracy" in message
    assert validation_warnings(history, mixing=True) == []


def test_an_honest_validation_does_not_warn():
    history = [_row(1, 0.4, 0.45), _row(2, 0.9, 0.8), _row(3, 0.95, 0.82)]
    assert validation_warnings(history) == []
    assert validation_warnings([]) == []
