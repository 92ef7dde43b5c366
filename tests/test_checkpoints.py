"""The run folder's commit protocol, with a small real Keras model."""

import json
import os

import numpy as np
import pytest

from shopee_tpu.checkpoints import ConfigMismatch, RunFolder
from shopee_tpu.config import RunConfig


def _model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _fit(model, steps=3):
    x = np.random.default_rng(1).normal(size=(steps * 4, 4)).astype("float32")
    y = np.random.default_rng(2).normal(size=(steps * 4, 3)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def test_commit_and_restore_weights_and_optimizer(tmp_path):
    model = _model()
    _fit(model)
    run = RunFolder(tmp_path)
    assert run.commit_epoch(
        model, 1, {"epoch": 1, "val_accuracy": 0.5}, monitor="val_accuracy"
    )
    assert not run.commit_epoch(
        model, 2, {"epoch": 2, "val_accuracy": 0.4}, monitor="val_accuracy"
    )
    assert sorted(os.listdir(tmp_path)) == [
        "best.weights.h5",
        "history.csv",
        "last.optimizer.npz",
        "last.weights.h5",
        "state.json",
    ]
    fresh = _model(seed=7)
    fresh.optimizer.build(fresh.trainable_variables)
    assert int(fresh.optimizer.iterations) == 0
    assert RunFolder(tmp_path).restore(fresh) == 2
    assert int(fresh.optimizer.iterations) == int(model.optimizer.iterations) == 3
    for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = json.load(open(tmp_path / "state.json"))
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    assert state["best"]["epoch"] == 1


def test_interrupted_commit_is_completed_or_discarded(tmp_path):
    model = _model()
    run = RunFolder(tmp_path)
    run.commit_epoch(
        model, 1, {"epoch": 1, "val_accuracy": 0.5}, monitor="val_accuracy"
    )
    # Killed after the commit point, before the renames: state names pending files.
    (tmp_path / ".pending-2-last.weights.h5").write_bytes(
        (tmp_path / "last.weights.h5").read_bytes()
    )
    state = json.load(open(tmp_path / "state.json"))
    state.update(epoch=2, pending={".pending-2-last.weights.h5": "last.weights.h5"})
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / ".pending-3-last.optimizer.npz").write_bytes(b"half written")
    run = RunFolder(tmp_path)
    assert run.epoch == 2
    assert "pending" not in json.load(open(tmp_path / "state.json"))
    # Pending files of an epoch that never committed are removed, not loaded.
    assert not any(n.startswith(".pending-") for n in os.listdir(tmp_path))


def test_changed_config_is_refused_with_the_difference_named(tmp_path):
    model = _model()
    cfg = RunConfig.preset("demo")
    run = RunFolder(tmp_path)
    run.check_config(cfg)
    run.commit_epoch(
        model, 1, {"epoch": 1, "val_accuracy": 0.5}, monitor="val_accuracy"
    )
    RunFolder(tmp_path).check_config(
        cfg.override("out_dir=elsewhere", "predict.reduce=beta")
    )
    with pytest.raises(ConfigMismatch, match=r"optim.learning_rate: 0.01 -> 0.1"):
        RunFolder(tmp_path).check_config(cfg.override("optim.learning_rate=0.1"))


def test_damaged_state_is_named(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json"):
        RunFolder(tmp_path)
