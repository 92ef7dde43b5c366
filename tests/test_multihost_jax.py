"""Several JAX hosts on one machine: the README's command line, run as written by
two processes x 4 host devices joined over loopback through Keras's distribution
variables, as the hosts of a TPU pod slice would be. Together they train one model.

What each process hands to its devices is recorded after Keras's own dataset
handling (``jax.make_array_from_process_local_data``, through which Keras's JAX
trainer sends every host's rows): each training image carries its record number
in its pixels, so the test sees which records each host fed at each step.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_training_jax import jax_env

from shopee_tpu.multihost import multi_host_reason

TRAIN, VALID = 200, 40  # records; ids 1..200 and 1001..1040 (0 is a blank row)
SIDE = 32

# Put on PYTHONPATH: Python imports it at start-up. It records, per process, the
# record ids of every image batch a process hands to its devices, and a checksum
# of the model's weights when fit starts and ends.
SITECUSTOMIZE = r'''
import atexit, hashlib, importlib.abc, importlib.util, json, os, sys, traceback
import numpy as np

LOG = os.environ["SHOPEE_TEST_FEED_LOG"]
log = {"feeds": [], "weights": []}


def decode(images):
    bands = np.asarray(images, np.float32).reshape(len(images), 4, -1).mean(-1)
    digits = np.clip(np.round((bands[:, :3] - 8) / 16), 0, 15).astype(int)
    return (digits[:, 0] * 256 + digits[:, 1] * 16 + digits[:, 2]).tolist()


def patch_jax(jax):
    original = jax.make_array_from_process_local_data

    def recorded(sharding, local_data, *args, **kwargs):
        x = np.asarray(local_data)
        if x.ndim == 4 and x.shape[-1] == 3:
            # Before its first step, fit takes one batch to build its metrics
            # (Keras's _symbolic_build); it trains nothing.
            peek = any(f.name == "_symbolic_build" for f in traceback.extract_stack())
            feed = {"dtype": str(x.dtype), "ids": decode(x), "peek": peek}
            log["feeds"].append(feed)
        return original(sharding, local_data, *args, **kwargs)

    jax.make_array_from_process_local_data = recorded


def patch_keras(keras):
    fit = keras.Model.fit

    def checksum(model):
        digest = hashlib.md5()
        for w in model.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
        return digest.hexdigest()

    def recorded(self, *args, **kwargs):
        log["weights"].append(["start", checksum(self)])
        history = fit(self, *args, **kwargs)
        log["weights"].append(["end", checksum(self)])
        return history

    keras.Model.fit = recorded


class After(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches jax and keras right after their first import (importing them here
    would start Keras before the command line chose anything)."""

    patches = {"jax": patch_jax, "keras": patch_keras}

    def find_spec(self, name, path=None, target=None):
        if name not in self.patches or name in sys.modules:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        self.loaders = getattr(self, "loaders", {})
        self.loaders[name] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        name = module.__spec__.name
        module.__loader__ = module.__spec__.loader = self.loaders[name]
        self.loaders[name].exec_module(module)
        self.patches[name](module)


sys.meta_path.insert(0, After())


@atexit.register
def save():
    with open(f"{LOG}.{os.environ['KERAS_DISTRIBUTION_PROCESS_ID']}", "w") as f:
        json.dump(log, f)
'''


def _image(record_id: int, label: int) -> bytes:
    """A JPEG whose three top row bands hold the id's base-16 digits (constant
    8-px bands survive JPEG and left-right flips) and whose last band its class."""
    from PIL import Image

    digits = (record_id // 256, record_id // 16 % 16, record_id % 16)
    values = [16 * d + 8 for d in digits] + [40 + 20 * label]
    pixels = np.repeat(np.repeat(np.array(values, np.uint8), 8)[:, None], SIDE, 1)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, -1)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _records(out, ids, shards):
    from shopee_tpu.data.records import write_records

    items = ((_image(i, i % 10), f"{i % 10:02d}", str(i), str(i)) for i in ids)
    write_records(items, out, shards=shards, workers=1, seed=0, verbose=False)
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_readme_command_on_two_jax_hosts_trains_one_model_on_disjoint_rows(
    tmp_path,
):
    train = _records(tmp_path / "train", range(1, TRAIN + 1), shards=5)
    valid = _records(tmp_path / "valid", range(1001, 1001 + VALID), shards=2)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out, log = tmp_path / "runs" / "hosts", tmp_path / "feeds"
    # The README's command, on a tiny model: 8 replicas x batch 2 = 16 a step.
    command = ["-m", "shopee_tpu", "train", "--preset", "shopee-b0"]
    for setting in (
        f"data.train={train}",
        f"data.valid={valid}",
        "model.backbone=tiny-cnn",
        "model.weights=none",
        f"data.image_size={SIDE}",
        "epochs=2",
        "batch_size=2",
    ):
        command += ["--set", setting]
    command += ["--out", str(out)]
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for index in range(2):
            env = jax_env(
                4,
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(index),
                SHOPEE_TEST_FEED_LOG=str(log),
            )
            env["PYTHONPATH"] = os.pathsep.join(
                [str(tmp_path / "site"), env["PYTHONPATH"]]
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:  # a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-6000:]
    assert "CPU x8" in outputs[0][0] and "hosts=2, worker 1/2" in outputs[0][0]

    feeds = [json.loads((tmp_path / f"feeds.{i}").read_text()) for i in range(2)]
    # Every batch crossed to the devices as uint8 pixels.
    assert {f["dtype"] for host in feeds for f in host["feeds"]} == {"uint8"}
    # One model: the same weights on both processes when fit starts and ends.
    assert feeds[0]["weights"] == feeds[1]["weights"]
    assert [tag for tag, _ in feeds[0]["weights"]] == ["start", "end"]

    steps = TRAIN // 16  # 12 steps an epoch: 192 of the 200 records
    rows = [
        [f["ids"] for f in host["feeds"] if 0 < f["ids"][0] <= TRAIN and not f["peek"]]
        for host in feeds
    ]
    for host in rows:  # one batch of 8 rows per step and host: 2 epochs
        assert len(host) == 2 * steps and {len(batch) for batch in host} == {8}
    epoch_1 = [{i for batch in host[:steps] for i in batch} for host in rows]
    # Each host fed its own records, 96 distinct ones; together 192 of the 200.
    assert epoch_1[0].isdisjoint(epoch_1[1])
    assert [len(ids) for ids in epoch_1] == [8 * steps, 8 * steps]
    assert epoch_1[0] | epoch_1[1] <= set(range(1, TRAIN + 1))

    # Validation: each host its own records, every record once (blank padding
    # rows decode to 0).
    seen = [
        i
        for host in feeds
        for f in host["feeds"]
        if not f["peek"]
        for i in f["ids"]
        if i > 1000
    ]
    assert sorted(seen) == sorted([*range(1001, 1001 + VALID)] * 3)  # 2 epochs, report

    # One run folder, written by process 0: exactly its epochs, once each.
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["replicas"], metrics["hosts"], metrics["backend"]) == (8, 2, "jax")
    assert metrics["train_images"] == TRAIN and metrics["valid_images"] == VALID
    assert 0 <= metrics["val_accuracy_best_weights"] <= 1
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2]
    assert history.iterations.tolist() == [steps, 2 * steps]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hosts"]


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
    # Slices made with gcloud name no hosts: their accelerator type tells.
    for kind, hosts in (("v5litepod-8", 1), ("v5litepod-16", 2), ("v4-32", 4)):
        reason = multi_host_reason({"TPU_ACCELERATOR_TYPE": kind})
        assert (reason is None) == (hosts == 1), kind
    # Kaggle's v5e-8 says `local`: never a peer to wait for, whatever the type.
    kaggle = {"ISTPUVM": "1", "TPU_PROCESS_ADDRESSES": "local"}
    assert multi_host_reason({**kaggle, "TPU_ACCELERATOR_TYPE": "v5litepod-8"}) is None


def test_a_pod_slice_joins_its_peers_and_a_single_host_never_waits(monkeypatch):
    import keras

    from shopee_tpu import multihost

    joined = []
    monkeypatch.setattr(keras.distribution, "initialize", lambda: joined.append(1))
    for name in (*multihost.KERAS_ENV, "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES"):
        monkeypatch.delenv(name, raising=False)
    # A slice made with gcloud: TPU chips attached, no variables; the metadata
    # server (faked) says v5litepod-16: JAX then finds the peers itself.
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    monkeypatch.delenv("TPU_PROCESS_ADDRESSES", raising=False)
    monkeypatch.setattr(multihost, "_tpu_device_files", lambda: True)
    monkeypatch.setattr(multihost, "gce_accelerator_type", lambda: "v5litepod-16")
    multihost.initialize_hosts()
    assert joined == [1]
    # Kaggle's single-host v5e-8: no join, no metadata question.
    monkeypatch.setenv("TPU_PROCESS_ADDRESSES", "local")
    monkeypatch.setattr(multihost, "gce_accelerator_type", lambda: 1 / 0)
    multihost.initialize_hosts()
    assert joined == [1]
