"""The keyword options of ``train()`` and of the experiments that pass them on:
a misspelt option, or a single run's option given to a k-fold run, a sweep or a
search, is refused by name before anything connects or reads a record; every
option is documented in its record."""

from __future__ import annotations

import time

import pytest

from shopee_tpu.config import RunConfig
from shopee_tpu.experiments import run_sweep, train_folds, tune
from shopee_tpu.training import SingleRunOptions, TrainOptions, train
from shopee_tpu.training.options import time_left, verbosity


def test_a_misspelt_option_is_refused_by_name():
    with pytest.raises(
        TypeError, match=r"^train\(\) got an unexpected keyword argument 'time_limt'$"
    ):
        train(RunConfig(), time_limt=60)


@pytest.mark.parametrize("option", ["resume_stopped", "predict_images", "fit_to_time"])
def test_the_experiments_refuse_a_single_runs_options(tmp_path, option):
    calls = {
        "train_folds": lambda: train_folds(RunConfig(), **{option: 1}),
        "run_sweep": lambda: run_sweep(RunConfig(), [], tmp_path, **{option: 1}),
        "tune": lambda: tune(RunConfig(), [], tmp_path, trials=1, **{option: 1}),
    }
    for name, call in calls.items():
        with pytest.raises(
            TypeError,
            match=rf"^{name}\(\) got an unexpected keyword argument '{option}'$",
        ):
            call()
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_every_option_is_documented_in_its_record():
    shared = set(TrainOptions.__optional_keys__)
    own = set(SingleRunOptions.__optional_keys__) - shared
    assert shared == {
        "time_limit",
        "checkpoint_every",
        "device",
        "accelerator",
        "verbose",
        "callbacks",
    }
    assert own == {"resume_stopped", "predict_images", "fit_to_time"}
    for record, names in ((TrainOptions, shared), (SingleRunOptions, own)):
        for name in names:
            assert record.__doc__.count(f"\n        {name}: ") == 1, (record, name)


def test_verbosity_and_time_left():
    assert verbosity({}) == verbosity({"verbose": None}) == 1
    assert verbosity({"verbose": 0}) == 0
    assert time_left({}, time.monotonic()) is None
    left = time_left({"time_limit": 10.0}, time.monotonic() - 4.0)
    assert 5.0 < left <= 6.0
