"""Your own callbacks in ``train()``: they see every epoch across a kill and resume,
``EarlyStopping`` ends a run as finished (committed, not retrained), and the CLI's
``--tensorboard`` writes event files into the run folder. Digits, tiny-cnn."""

from __future__ import annotations

import glob
import json
import os
import runpy
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from conftest import REPO, TINY, kill_when

from shopee_tpu.config import RunConfig

SETS = (*TINY, "batch_size=16", "optim.warmup_epochs=0.5")


def _config(records, out, *extra) -> RunConfig:
    return RunConfig.preset("demo").override(
        f"data.train={records['train']}", f"out_dir={out}", *SETS, *extra
    )


@pytest.mark.slow
def test_a_callback_sees_every_epoch_across_a_kill_and_resume(digits_records, tmp_path):
    out, seen = tmp_path / "run", tmp_path / "seen.txt"
    cfg = _config(digits_records, out, "epochs=4", "steps_per_epoch=60")
    cfg.save(tmp_path / "cfg.json")
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import keras
        from shopee_tpu.config import RunConfig
        from shopee_tpu.training import train

        class Seen(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                with open({str(seen)!r}, "a") as f:
                    f.write(f"{{epoch + 1}} {{logs['val_accuracy']:.4f}}\\n")

        if __name__ == "__main__":
            cfg = RunConfig.load({str(tmp_path / "cfg.json")!r})
            train(cfg, callbacks=[Seen()], checkpoint_every=0, verbose=0)
        """)
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stderr=subprocess.PIPE
    )
    kill_when(
        proc,
        lambda: seen.exists() and seen.read_text().count("\n") >= 2,
        timeout=300,
    )
    killed_at = json.loads((out / "state.json").read_text())["epoch"]
    assert 2 <= killed_at < 4

    # The same script resumes the run in another process (this one).
    runpy.run_path(str(script), run_name="__main__")
    rows = [line.split() for line in seen.read_text().splitlines()]
    epochs = [int(e) for e, _ in rows]
    # Ours commit each epoch before the callback sees it, so an epoch it saw is
    # never trained again, and the resume starts right after the last one.
    assert epochs == [1, 2, 3, 4]
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2, 3, 4]
    by_epoch = {int(e): float(a) for e, a in rows}
    for row in history.itertuples():
        assert by_epoch[row.epoch] == pytest.approx(row.val_accuracy, abs=1e-4)


@pytest.mark.slow
def test_early_stopping_ends_a_finished_run_that_a_rerun_leaves_alone(
    digits_records, tmp_path
):
    import keras

    from shopee_tpu.training import train

    out = tmp_path / "run"
    cfg = _config(digits_records, out, "epochs=5", "steps_per_epoch=4")

    def stopper():  # no epoch improves the loss by 100: stops after epoch 2
        return keras.callbacks.EarlyStopping(monitor="loss", min_delta=100, patience=1)

    first = train(cfg, callbacks=[stopper()], checkpoint_every=1e9, verbose=0)
    assert first.metrics["epochs_completed"] == 2
    assert first.metrics["finished"] is True
    assert first.metrics["stop_reason"] == "stopped by a callback after epoch 2"
    state = json.loads((out / "state.json").read_text())
    assert (state["epoch"], state["finished"]) == (2, True)
    assert pd.read_csv(out / "history.csv").epoch.tolist() == [1, 2]

    mtime = os.path.getmtime(out / "last.weights.h5")
    again = train(cfg, callbacks=[stopper()], verbose=0)
    assert again.metrics["epochs_completed"] == 2 and again.metrics["finished"]
    assert os.path.getmtime(out / "last.weights.h5") == mtime

    # Past it on purpose: the remaining epochs, from the committed state.
    more = train(cfg, resume_stopped=True, verbose=0)
    assert more.metrics["epochs_completed"] == 5 and more.metrics["finished"]
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2, 3, 4, 5]
    assert history.iterations.tolist() == [4, 8, 12, 16, 20]


@pytest.mark.slow
def test_the_cli_writes_tensorboard_logs_into_the_run_folder(digits_records, tmp_path):
    from shopee_tpu.cli import main

    cfg = _config(digits_records, tmp_path / "run", "epochs=2", "steps_per_epoch=3")
    cfg.save(tmp_path / "cfg.json")
    args = ["train", "--config", str(tmp_path / "cfg.json"), "--tensorboard"]
    assert main(args) == 0
    events = glob.glob(str(tmp_path / "run" / "tensorboard" / "*" / "events.out.*"))
    assert {os.path.basename(os.path.dirname(e)) for e in events} == {
        "train",
        "validation",
    }
    assert all(os.path.getsize(e) > 0 for e in events)
    # With --folds it is refused in one line instead of being ignored.
    assert main([*args, "--folds", "2", "--out", str(tmp_path / "k")]) == 1
