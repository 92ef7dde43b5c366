"""Shared fixtures: small real images (scikit-learn's digits) in the Shopee layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# Quiet TensorFlow's C++ logging in tests and subprocesses; keep oneDNN on as in use.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX compiles at LLVM's lowest optimisation level in every process of the session:
# the tests prove behaviour, not speed, and on 2 cores compiling costs them more
# than running (the TF-vs-JAX small_resnet child: 31 s of CPU at the default level,
# 12.5 s at 0). A child that sets XLA_FLAGS itself uses xla_flags().
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", XLA_TEST_FLAGS)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a JAX child over ``devices`` host devices."""
    return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test backbone for runs that prove plumbing (resume, time budgets, k-fold,
# sweeps, several processes): tiny-cnn traces in a second or two where even the
# smallest EfficientNet takes tens of seconds (shopee_tpu.models.tiny). The
# EfficientNet itself is trained by the demo, the photo-preset and the 8-device
# JAX tests.
TINY = ("model.backbone=tiny-cnn", "data.image_size=32")


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every process of the session
    (xdist workers and the JAX children they start), kept for programs of any
    compile time: a resumed run, a second host or a later test then loads what
    an earlier one compiled instead of compiling it again. The size limit turns
    on JAX's file lock, so processes that write and read it at once are safe."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    path = shared / "jax_cache"
    path.mkdir(exist_ok=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=str(path),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30),
    )
    return str(path)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """About 300 real digit scans as 32-px JPEGs in the Shopee competition layout."""
    from shopee_tpu.data.samples.digits import make_digits_dataset

    out = tmp_path_factory.mktemp("digits")
    info = make_digits_dataset(out, image_size=32, limit=300, seed=0)
    return info


def photo_crops(n: int, size: int, *, seed: int = 0):
    """``n`` real photo crops, uint8 ``[n, size, size, 3]``: random squares of
    scikit-learn's two sample photos (china.jpg, flower.jpg), resized with PIL."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return out


def stored_records(out_dir) -> dict[str, tuple[int, bytes]]:
    """``{id: (label, stored image bytes)}`` of every record a records folder's
    manifest lists."""
    import tensorflow as tf

    from shopee_tpu.data.manifests import read_manifest
    from shopee_tpu.data.tfrecord import read_records

    out = {}
    for name in read_manifest(out_dir)["shards"]:
        for raw in read_records(os.path.join(out_dir, name)):
            f = tf.train.Example.FromString(raw).features.feature
            out[f["id"].bytes_list.value[0].decode()] = (
                f["label"].int64_list.value[0],
                f["image"].bytes_list.value[0],
            )
    return out


def run_python(code: str, *, env: dict | None = None, timeout: float = 600) -> str:
    """Runs ``code`` in a fresh interpreter (for backends and device setups that
    must be chosen before TensorFlow or Keras start); returns stdout, raises with
    stderr on failure."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    # The tests folder too: the code may import test helpers (conftest, modules).
    full_env.setdefault(
        "PYTHONPATH", os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def kill_when(proc, ready, *, timeout: float, poll: float = 0.02) -> None:
    """SIGKILLs ``proc`` as soon as ``ready()`` holds (or after ``timeout`` s);
    fails with its stderr when it ended on its own first."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(poll)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:  # the pipe, once read or no longer needed
            proc.stderr.close()


@pytest.fixture(scope="session")
def digits_records(digits_dir, tmp_path_factory):
    """The digits fixture written as train (4 shards) and test (1 shard) records."""
    from shopee_tpu.data.write.records import write_records_from_csv

    out = tmp_path_factory.mktemp("digits_records")
    common = dict(
        image_size=None, resize="square", quality=95, workers=1, overwrite=False
    )
    write_records_from_csv(
        digits_dir["train_csv"],
        digits_dir["train_images"],
        out / "train",
        test=False,
        shards=4,
        label_map=None,
        seed=0,
        **common,
    )
    write_records_from_csv(
        digits_dir["test_csv"],
        digits_dir["test_images"],
        out / "test",
        test=True,
        shards=1,
        label_map=str(out / "train" / "manifest.json"),
        seed=0,
        **common,
    )
    return {**digits_dir, "train": str(out / "train"), "test": str(out / "test")}


def pytest_collection_modifyitems(items):
    # Slow tests first (a stable sort keeps the rest in file order): on two workers
    # a long test or fixture group that starts last leaves the other worker idle.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    # `make test` keeps each xdist_group (tests sharing an expensive module fixture)
    # on one worker. pytest 9.2's structured node ids make pytest-xdist 3.8 drop the
    # marks silently (pytest-xdist#1386): every group's fixture is then built on both
    # workers and the suite takes minutes longer. Refuse, and say why.
    grouped = getattr(config.option, "dist", None) == "loadgroup"
    if grouped and pytest.version_tuple[:2] >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} breaks --dist loadgroup (pytest-xdist#1386);"
            " install the pytest that setup.cfg [test] pins (make venv)"
        )
