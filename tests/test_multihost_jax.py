"""Multi-host JAX on one machine: two processes x 4 host devices joined over
loopback through Keras's distribution variables, as the hosts of a TPU pod slice
would be. Each runs ``train()``; together they are 8 replicas of one model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_training_jax import jax_env, result_of, shopee_b0_tiny

from shopee_tpu.multihost import multi_host_reason

HOST = r"""
import json, sys
import numpy as np
import shopee_tpu
from shopee_tpu.config import RunConfig
from shopee_tpu.training import train

acc = shopee_tpu.connect()  # joins the other process (KERAS_DISTRIBUTION_*)
result = train(RunConfig.load(sys.argv[1]), accelerator=acc, verbose=0)
weights = result.model.get_weights()
np.savez(sys.argv[2], *weights)
print("RESULT " + json.dumps(dict(
    summary=acc.summary, replicas=acc.replicas, hosts=acc.num_workers,
    index=acc.worker_index, local=acc.local_replicas,
    epochs=result.metrics["epochs_completed"],
    iterations=int(np.asarray(result.model.optimizer.iterations)))))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_over_loopback_train_one_model(digits_records, tmp_path):
    out = tmp_path / "run"
    # Global batch 8 replicas x 2 = 16; each process feeds 8 rows per step.
    cfg = shopee_b0_tiny(
        digits_records,
        out,
        "model.backbone=tiny-cnn",
        "epochs=2",
        "batch_size=2",
        "optim.steps_per_execution=4",
    )
    cfg.save(tmp_path / "cfg.json")
    script = tmp_path / "host.py"
    script.write_text(HOST)
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for index in range(2):
            env = jax_env(
                4,
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(index),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(tmp_path / "cfg.json")]
                    + [str(tmp_path / f"weights{index}.npz")],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=1800) for p in procs]
    finally:
        for p in procs:  # a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-6000:]

    results = [result_of(stdout) for stdout, _ in outputs]
    assert [r["index"] for r in results] == [0, 1]
    for r in results:
        assert (r["replicas"], r["hosts"], r["local"]) == (8, 2, 4)
        assert "CPU x8" in r["summary"] and "hosts=2" in r["summary"]
        # 184 records / 16 = 11 steps, rounded to whole calls of 4: 8 per epoch.
        assert (r["epochs"], r["iterations"]) == (2, 16)

    # One run folder, written by process 0: exactly its epochs, once each.
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["replicas"], metrics["hosts"], metrics["backend"]) == (8, 2, "jax")
    assert metrics["valid_images"] % 16  # the last validation batch was padded
    assert 0 <= metrics["val_accuracy_best_weights"] <= 1
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2]
    assert history.iterations.tolist() == [8, 16]
    assert np.isfinite(history.val_loss).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]

    # Every process ends with the same weights.
    a, b = (np.load(tmp_path / f"weights{i}.npz") for i in range(2))
    assert a.files == b.files and len(a.files) > 10
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_multi_host_detection_from_the_environment():
    assert multi_host_reason({}) is None
    assert multi_host_reason({"TPU_PROCESS_ADDRESSES": "local"}) is None  # Kaggle
    assert multi_host_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert "2 hosts" in multi_host_reason({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"})
    assert "MEGASCALE" in multi_host_reason({"MEGASCALE_NUM_SLICES": "2"})
    assert "KERAS" in multi_host_reason(
        {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"}
    )
    assert multi_host_reason({"KERAS_DISTRIBUTION_NUM_PROCESSES": "1"}) is None
