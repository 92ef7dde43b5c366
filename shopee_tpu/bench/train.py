"""``shopee-tpu bench train``: our training step against plain keras.applications.

Both sides train EfficientNet-B0 (same size, same data, same batch, same machine) with
``model.fit`` on an in-memory ``tf.data`` pipeline, so what differs is only the
library: our builder and compile recipe (label smoothing, schedule, metrics) against
``keras.applications.EfficientNetB0`` with a plain Adam compile. Rounds alternate A
and B and the median of the per-round ratios is reported; the target is >= 1.0.
The JAX backend figure is measured in a subprocess, since a process has one backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from shopee_tpu.bench import alternate, median_ratio, photo_crops

IMAGE_SIZE = 128
BATCH = 16
CLASSES = 10


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real photo crops with random one-hot labels."""
    labels = np.eye(CLASSES, dtype=np.float32)
    labels = labels[np.random.default_rng(seed).integers(0, CLASSES, n)]
    return photo_crops(n, size, seed), labels


def _dataset(images, labels, batch):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _ours(size: int):
    from shopee_tpu.config import OptimConfig
    from shopee_tpu.models import compile_model, efficientnet

    model = efficientnet(0, CLASSES, input_size=size)
    compile_model(model, OptimConfig(), steps_per_epoch=100, epochs=10)
    return model


def _plain(size: int):
    import keras

    model = keras.applications.EfficientNetB0(
        weights=None, input_shape=(size, size, 3), classes=CLASSES
    )
    model.compile(
        optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def _rate(model, ds, steps: int, batch: int) -> float:
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch / (time.perf_counter() - start)


def measure_jax(size: int, batch: int, steps: int) -> float | None:
    """Images/s of our training step on the JAX backend (fresh interpreter)."""
    code = (
        "import json,sys; from shopee_tpu.bench.train import _jax_child;"
        f"print(json.dumps(_jax_child({size},{batch},{steps})))"
    )
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _jax_child(size: int, batch: int, steps: int) -> float:
    images, labels = _images(64, size)
    model = _ours(size)
    ds = _dataset(images, labels, batch)
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)  # compile
    return round(_rate(model, ds, steps, batch), 2)


def run(args) -> dict:
    """Runs the benchmark; ``args`` carries ``rounds`` and ``seconds``."""
    rounds = max(int(args.rounds or 5), 1)
    size, batch = IMAGE_SIZE, BATCH
    images, labels = _images(64, size)
    ds = _dataset(images, labels, batch)
    models = {"ours": _ours(size), "keras_applications": _plain(size)}
    for m in models.values():  # trace and warm up before timing
        m.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    # Calibrate steps so one measurement lasts about `seconds`.
    probe = _rate(models["ours"], ds, 3, batch)
    seconds = float(args.seconds or 20.0)
    steps = max(3, int(probe * seconds / batch))
    rates = alternate(
        {name: (lambda m=m: _rate(m, ds, steps, batch)) for name, m in models.items()},
        rounds,
    )
    result = {
        "benchmark": "train",
        "model": "EfficientNet-B0",
        "image_size": size,
        "batch_size": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "ours_img_per_sec": round(float(np.median(rates["ours"])), 2),
        "keras_applications_img_per_sec": round(
            float(np.median(rates["keras_applications"])), 2
        ),
        "ratio_ours_vs_keras_applications": round(
            median_ratio(rates["ours"], rates["keras_applications"]), 3
        ),
        "ours_rounds": [round(r, 2) for r in rates["ours"]],
        "keras_applications_rounds": [round(r, 2) for r in rates["keras_applications"]],
        "target_ratio": 1.0,
    }
    result["jax_img_per_sec"] = measure_jax(size, batch, max(3, steps // 4))
    return result
