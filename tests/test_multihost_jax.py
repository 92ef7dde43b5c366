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
import time

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


def ids_of(images) -> list[int]:
    """The record ids that images made by ``_image`` carry (as SITECUSTOMIZE reads
    them in the hosts)."""
    bands = np.asarray(images, np.float32).reshape(len(images), 4, -1).mean(-1)
    digits = np.clip(np.round((bands[:, :3] - 8) / 16), 0, 15).astype(int)
    return (digits[:, 0] * 256 + digits[:, 1] * 16 + digits[:, 2]).tolist()


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


def records_with_ids(out, ids, shards):
    """Records of ``ids``, each image carrying its id (``ids_of`` reads it back)."""
    from shopee_tpu.data.write.records import write_records

    items = ((_image(i, i % 10), f"{i % 10:02d}", str(i), str(i)) for i in ids)
    write_records(items, out, shards=shards, workers=1, seed=0, verbose=False)
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hosts(
    args: list[str],
    *,
    hosts: int = 2,
    devices: int = 2,
    path: list[str] = (),
    timeout: float = 900,
    **extra: str,
) -> list[tuple[int, str, str]]:
    """Runs ``python *args`` as ``hosts`` JAX processes of ``devices`` host
    devices each, joined over loopback through Keras's distribution variables, as
    the hosts of a pod slice (``KERAS_DISTRIBUTION_PROCESS_ID`` is each one's
    index). Returns each one's ``(return code, stdout, stderr)``; processes still
    running after ``timeout`` seconds (a hung collective) are killed, and the
    test fails."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for index in range(hosts):
            env = jax_env(
                devices,
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES=str(hosts),
                KERAS_DISTRIBUTION_PROCESS_ID=str(index),
                **extra,
            )
            env["PYTHONPATH"] = os.pathsep.join([*path, env["PYTHONPATH"]])
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        outputs = [
            p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs
        ]
    finally:
        for p in procs:  # a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.slow
def test_the_readme_command_on_two_jax_hosts_trains_one_model_on_disjoint_rows(
    tmp_path,
):
    train = records_with_ids(tmp_path / "train", range(1, TRAIN + 1), shards=5)
    valid = records_with_ids(tmp_path / "valid", range(1001, 1001 + VALID), shards=2)
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
    outputs = run_hosts(
        command,
        devices=4,
        path=[str(tmp_path / "site")],
        SHOPEE_TEST_FEED_LOG=str(log),
    )
    for code, _, stderr in outputs:
        assert code == 0, stderr[-6000:]
    assert "CPU x8" in outputs[0][1] and "hosts=2, worker 1/2" in outputs[0][1]

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
    epochs = [
        [
            {i for batch in host[e * steps : (e + 1) * steps] for i in batch}
            for host in rows
        ]
        for e in range(2)
    ]
    # Each host fed its own records in every epoch (a host's part is the same
    # in every pass); in the first, 96 distinct ones each, 192 of the 200.
    for epoch in epochs:
        assert epoch[0].isdisjoint(epoch[1])
        assert epoch[0] | epoch[1] <= set(range(1, TRAIN + 1))
    assert [len(ids) for ids in epochs[0]] == [8 * steps, 8 * steps]

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
