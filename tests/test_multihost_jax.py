"""Several JAX hosts on one machine: how a process finds its peers, and the tools
the multi-host tests share: ``run_hosts`` starts processes joined over loopback
through Keras's distribution variables, as the hosts of a TPU pod slice;
``SITECUSTOMIZE`` records what each hands to its devices; ``records_with_ids``
writes images that carry their record ids (the README command's run on two hosts
is in test_multihost_runs.py).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
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
