"""The run folder's commit protocol, with a small real Keras model."""

import json
import os
import warnings

import h5py
import numpy as np
import pytest

from shopee_tpu.config import RunConfig
from shopee_tpu.run_folder import ConfigMismatch, RunFolder


def _model(seed=0, optimizer=None):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse")
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
        "last.weights.h5",
        "state.json",
    ]
    # The optimizer is stored once, inside `last` the way Keras' save_weights does.
    with h5py.File(tmp_path / "last.weights.h5") as f:
        assert len(f["optimizer/vars"]) == len(model.optimizer.variables)
    with h5py.File(tmp_path / "best.weights.h5") as f:
        assert "optimizer" not in f
    # A fresh compiled model whose optimizer is not built yet: restore builds it
    # first, so every optimizer variable is loaded and none is skipped.
    fresh = _model(seed=7)
    assert not fresh.optimizer.built
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert RunFolder(tmp_path).restore(fresh) == 2
    assert int(fresh.optimizer.iterations) == int(model.optimizer.iterations) == 3
    for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = json.load(open(tmp_path / "state.json"))
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    assert state["best"]["epoch"] == 1
    # `best` loads without touching the optimizer.
    other = _model(seed=8)
    RunFolder(tmp_path).restore(other, optimizer=False, which=RunFolder.BEST)
    assert int(other.optimizer.iterations) == 0


def test_restore_refuses_an_optimizer_state_that_does_not_fit(tmp_path):
    import keras

    model = _model()
    _fit(model)
    RunFolder(tmp_path).commit_epoch(
        model, 1, {"epoch": 1, "val_accuracy": 0.5}, monitor="val_accuracy"
    )
    plain_sgd = _model(optimizer=keras.optimizers.SGD(1e-2))
    with pytest.raises(ValueError, match=r"last.weights.h5: holds \d+ optimizer"):
        RunFolder(tmp_path).restore(plain_sgd)


def _epoch_of(path) -> int:
    with h5py.File(path) as f:
        return int(f.attrs["shopee_tpu_epoch"])


def test_interrupted_commit_is_completed_or_discarded(tmp_path):
    model = _model()
    run = RunFolder(tmp_path)
    run.commit_epoch(
        model, 1, {"epoch": 1, "val_accuracy": 0.5}, monitor="val_accuracy"
    )
    # Killed after the commit point of epoch 2, before the renames: state.json
    # names the pending file, which holds other weights than epoch 1's.
    _fit(model)
    other = tmp_path / "elsewhere"
    RunFolder(other).commit_epoch(
        model, 2, {"epoch": 2, "val_accuracy": 0.6}, monitor="val_accuracy"
    )
    os.replace(other / "last.weights.h5", tmp_path / ".pending-2-last.weights.h5")
    state = json.load(open(tmp_path / "state.json"))
    state.update(epoch=2, pending={".pending-2-last.weights.h5": "last.weights.h5"})
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / ".pending-3-last.weights.h5").write_bytes(b"half written")
    assert _epoch_of(tmp_path / "last.weights.h5") == 1

    run = RunFolder(tmp_path)
    assert run.epoch == 2
    assert "pending" not in json.load(open(tmp_path / "state.json"))
    # The rename happened: `last` now holds epoch 2's weights, trained further.
    assert _epoch_of(tmp_path / "last.weights.h5") == 2
    restored = _model(seed=5)
    run.restore(restored)
    for a, b in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
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


def test_the_best_epoch_is_chosen_among_epochs_at_the_latest_image_size(tmp_path):
    model = _model()
    _fit(model)
    run = RunFolder(tmp_path)

    def commit(epoch, size, accuracy):
        row = {"epoch": epoch, "image_size": size, "val_accuracy": accuracy}
        return run.commit_epoch(model, epoch, row, monitor="val_accuracy")

    assert commit(1, 48, 0.9)
    # 0.6 at 64 px replaces 0.9 at 48 px: the smaller size's score does not carry.
    assert commit(2, 64, 0.6) and run.state["best"]["epoch"] == 2
    assert not commit(3, 64, 0.5)
    assert commit(4, 64, 0.7)
    assert run.state["best"] == {
        "epoch": 4,
        "monitor": "val_accuracy",
        "value": 0.7,
        "image_size": 64,
    }
