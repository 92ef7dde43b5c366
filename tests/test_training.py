"""Training that survives interruption: resume after SIGKILL, time budget, refusal of a
changed config, and the run folder's outputs. Small real data (digits), tiny-cnn."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TINY, kill_when, photo_crops

from shopee_tpu.config import RunConfig
from shopee_tpu.run_folder import ConfigMismatch

SETS = (
    *TINY,
    "batch_size=16",
    "optim.warmup_epochs=0.5",
)


def _config(records, out, *extra):
    return RunConfig.preset("demo").override(
        f"data.train={records['train']}", f"out_dir={out}", *SETS, *extra
    )


@pytest.mark.slow
def test_killed_run_resumes_with_exact_history_and_optimizer_count(
    digits_records, tmp_path
):
    out = tmp_path / "run"
    steps = 120  # about a second an epoch: the kill lands before the run ends
    cfg = _config(digits_records, out, "epochs=3", f"steps_per_epoch={steps}")
    cfg_path = tmp_path / "cfg.json"
    cfg.save(cfg_path)
    cmd = [sys.executable, "-m", "shopee_tpu.cli", "train", "--config", str(cfg_path)]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state_path = out / "state.json"
    kill_when(
        proc,
        lambda: state_path.exists() and json.loads(state_path.read_text())["epoch"],
        timeout=300,
    )
    # Killed after a commit and before the end (epoch 2 commits too when it is a
    # new best, so the kill may find 1 or 2 epochs committed).
    state = json.loads((out / "state.json").read_text())
    killed_at = state["epoch"]
    assert killed_at in (1, 2) and not state["finished"]

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {killed_at} of 3" in result.stdout
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2, 3]
    # The optimizer's step count continued (120, 240, 360) instead of restarting.
    assert history.iterations.tolist() == [steps, 2 * steps, 3 * steps]
    assert json.loads((out / "state.json").read_text())["finished"]


@pytest.mark.slow
def test_time_budget_stops_with_a_loadable_checkpoint_and_config_is_locked(
    digits_records, tmp_path
):
    from shopee_tpu.models import build_from_config
    from shopee_tpu.training import train

    out = tmp_path / "run"
    cfg = _config(digits_records, out, "epochs=2", "steps_per_epoch=4")
    result = train(cfg, time_limit=0.001, verbose=0)
    assert result.metrics["epochs_completed"] == 1
    assert result.metrics["finished"] is False
    assert "time limit" in result.metrics["stop_reason"]
    # The checkpoint loads into a fresh model and predicts like the returned model.
    fresh = build_from_config(cfg.model, 10, image_size=32)
    fresh.load_weights(out / "best.weights.h5")
    x = photo_crops(4, 32, seed=0).astype("float32")
    np.testing.assert_allclose(
        fresh.predict_on_batch(x), result.model.predict_on_batch(x), atol=1e-5
    )
    with pytest.raises(ConfigMismatch, match="optim.learning_rate"):
        train(cfg.override("optim.learning_rate=0.5"), verbose=0)
    # The same config resumes and finishes; a finished run is then not retrained.
    done = train(cfg, verbose=0)
    assert done.metrics["epochs_completed"] == 2 and done.metrics["finished"]
    mtime = os.path.getmtime(out / "last.weights.h5")
    again = train(cfg, verbose=0)
    assert again.metrics["epochs_completed"] == 2
    assert os.path.getmtime(out / "last.weights.h5") == mtime

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("best_val_accuracy", "final_val_accuracy", "val_accuracy_best_weights"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["images_per_sec"] > 0 and metrics["wall_time_sec"] > 0
    assert (
        metrics["valid_images"] > 0
        and metrics["train_images"] > metrics["valid_images"]
    )
    for png in (
        "history.png",
        "lr_schedule.png",
        "confusion_matrix.png",
        "sample_predictions.png",
    ):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
    assert json.loads((out / "label_map.json").read_text()) == {
        f"{d:02d}": d for d in range(10)
    }


@pytest.mark.slow
def test_without_a_holdout_trains_on_every_record_and_returns_the_last_ema_weights(
    digits_records, tmp_path
):
    from shopee_tpu.data.read.pipeline import count_records
    from shopee_tpu.models import build_from_config
    from shopee_tpu.training import train

    out = tmp_path / "run"
    cfg = _config(
        digits_records, out, "data.valid_fraction=0", "epochs=2", "steps_per_epoch=4"
    )
    assert cfg.optim.ema  # the demo recipe: `best` must hold the EMA weights
    first = train(cfg, time_limit=0.001, verbose=0)  # stops after epoch 1: resume
    assert first.metrics["best_epoch"] == first.metrics["epochs_completed"] == 1
    result = train(cfg, verbose=0)
    metrics = result.metrics
    assert metrics["train_images"] == count_records(digits_records["train"])
    assert metrics["valid_images"] == 0 and metrics["best_val_accuracy"] is None
    assert metrics["best_epoch"] == metrics["epochs_completed"] == 2
    assert all("val_accuracy" not in row for row in result.history)
    x = photo_crops(4, 32, seed=0).astype("float32")
    saved = {}
    for name in ("best", "last"):
        model = build_from_config(cfg.model, 10, image_size=32)
        model.load_weights(out / f"{name}.weights.h5")
        saved[name] = model.predict_on_batch(x)
    # Returned: the last epoch's EMA weights (`best`), not its raw weights (`last`).
    np.testing.assert_allclose(
        result.model.predict_on_batch(x), saved["best"], atol=1e-5
    )
    assert np.abs(saved["best"] - saved["last"]).max() > 1e-3
    assert (out / "history.png").exists() and not (
        out / "confusion_matrix.png"
    ).exists()
