"""A JAX run whose records and run folder are in a bucket, against a real GCS
emulator on loopback (tests/gcs_server.py): records read by ``tf.data`` from
``gs://``, the run folder written through ``shopee_tpu.fs``, a SIGKILL mid-run, the
resume, and ``shopee-tpu predict`` from the bucket."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TINY, kill_when
from gcs_server import GcsEmulator

from shopee_tpu import fs
from shopee_tpu.config import RunConfig

RUN, RECS = "gs://bucket/run", "gs://bucket/recs"
STEPS = 40
SPLIT = "=== predict ===\n"
# `shopee-tpu train ARGS` then `shopee-tpu predict ARGS`, in one process.
RESUME_THEN_PREDICT = f"""
import sys
from shopee_tpu.cli import main

at = sys.argv.index("--")
assert main(sys.argv[1:at]) == 0
print({SPLIT!r}, end="", flush=True)
assert main(sys.argv[at + 1 :]) == 0
"""


def _committed_epoch() -> int:
    try:
        return fs.read_json(f"{RUN}/state.json")["epoch"]
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.long
def test_jax_run_in_a_bucket_resumes_after_sigkill_and_predicts(
    digits_records, tmp_path, monkeypatch
):
    with GcsEmulator(tmp_path) as gcs:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        for split in ("train", "test"):
            for name in os.listdir(digits_records[split]):
                fs.put(
                    os.path.join(digits_records[split], name),
                    f"{RECS}/{split}/{name}",
                )
        cfg = RunConfig.preset("demo").override(
            f"data.train={RECS}/train",
            f"out_dir={RUN}",
            *TINY,
            "batch_size=16",
            "epochs=3",
            f"steps_per_epoch={STEPS}",
        )
        cfg_path = tmp_path / "cfg.json"
        cfg.save(cfg_path)
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            KERAS_BACKEND="jax",
            JAX_PLATFORMS="cpu",
            **gcs.env(),
        )
        cli = [sys.executable, "-m", "shopee_tpu.cli"]
        train = [*cli, "train", "--config", str(cfg_path)]
        proc = subprocess.Popen(
            train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        kill_when(proc, _committed_epoch, timeout=300, poll=0.2)
        state = fs.read_json(f"{RUN}/state.json")
        killed_at = state["epoch"]
        assert killed_at in (1, 2) and not state["finished"]

        # One process resumes the run, then predicts from the bucket (each
        # process pays ~10 s of imports): the two commands, one after the other.
        sub = "gs://bucket/preds/submission.csv"
        predict = ["predict", "--run", RUN, "--data", f"{RECS}/test", "--out", sub]
        done = subprocess.run(
            [sys.executable, "-c", RESUME_THEN_PREDICT, *train[3:], "--", *predict],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        resumed, _ = done.stdout.split(SPLIT)
        assert f"resuming after epoch {killed_at} of 3" in resumed
        history = pd.read_csv(io.StringIO(fs.read_text(f"{RUN}/history.csv")))
        assert history.epoch.tolist() == [1, 2, 3]
        assert history.iterations.tolist() == [STEPS, 2 * STEPS, 3 * STEPS]
        assert fs.read_json(f"{RUN}/state.json")["finished"]
        # Only the run's own files: no pending weights, no temporary objects.
        run_files = {n[4:] for n in gcs.objects() if n.startswith("run/")}
        assert {
            "config.json",
            "label_map.json",
            "state.json",
            "history.csv",
            "metrics.json",
            "last.weights.h5",
            "best.weights.h5",
        } <= run_files
        assert not [n for n in run_files if n.startswith(".")], run_files
        submission = pd.read_csv(io.StringIO(fs.read_text(sub)))
        want = pd.read_csv(digits_records["test_csv"])["filename"]
        assert sorted(submission["filename"]) == sorted(want)

        # The same weights, copied out of the bucket, predict the same
        # probabilities from the local records (here on the TensorFlow backend).
        from shopee_tpu.inference.run import predict_run

        local_run = tmp_path / "run"
        local_run.mkdir()
        for name in ("config.json", "label_map.json", "best.weights.h5"):
            (local_run / name).write_bytes(fs.read_bytes(f"{RUN}/{name}"))
        remote = np.load(io.BytesIO(fs.read_bytes(sub[:-4] + ".probs.npz")))
        local_sub = tmp_path / "local.csv"
        predict_run(local_run, digits_records["test"], out=local_sub, verbose=False)
        saved = np.load(str(local_sub)[:-4] + ".probs.npz")
        assert saved["ids"].tolist() == remote["ids"].tolist()
        np.testing.assert_allclose(saved["probs"], remote["probs"], atol=2e-3)
        assert json.loads(fs.read_text(f"{RUN}/metrics.json"))["finished"]
