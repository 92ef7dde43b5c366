"""``shopee-tpu bench predict``: K TTA views in one batched call against K passes.

Same model (our EfficientNet-B0, random weights), same images, same batches. A is
the compiled TTA call of ``predict`` with K views (built on the device and
classified in one call); B is the same call with one view; the reference for K views
is K x B. Each batch goes through A and B back to back (order alternating), so the
other processes on a shared machine weigh on both alike; the figure is the median
over rounds of ``time(A) / (K * time(B))``, target <= 1.1 (batched TTA adds no
overhead beyond the extra arithmetic). Whole ``predict()`` passes over a tf.data
pipeline, alternating, give the end-to-end ratio as a second figure.
"""

from __future__ import annotations

import time

import numpy as np

from shopee_tpu.bench import alternate, photo_crops

VIEWS = ("identity", "flip_lr", "flip_ud", "rot180")
IMAGE_SIZE = 96
BATCH = 16
CLASSES = 10
BACKBONE = "efficientnet-b0"


def _model(size: int):
    try:
        from shopee_tpu.models import build_model

        return build_model(BACKBONE, CLASSES, input_size=size), BACKBONE
    except ImportError:  # the models package is absent: a stock Keras network
        import keras

        model = keras.applications.EfficientNetB0(
            weights=None, input_shape=(size, size, 3), classes=CLASSES
        )
        return model, "keras.applications.EfficientNetB0"


def _interleaved(step_k, step_1, batches, k: int, rounds: int) -> dict:
    """Per round, each batch goes through the K-view call and the one-view call
    back to back (the order alternating by batch), so both see the same machine
    load; returns the per-round seconds of each and the ratios."""
    batched, single = [], []
    for r in range(rounds):
        t_k = t_1 = 0.0
        for i, x in enumerate(batches):
            order = (step_k, step_1) if (i + r) % 2 == 0 else (step_1, step_k)
            for step in order:
                start = time.perf_counter()
                step(x)
                elapsed = time.perf_counter() - start
                if step is step_k:
                    t_k += elapsed
                else:
                    t_1 += elapsed
        batched.append(t_k)
        single.append(t_1)
    ratios = [a / (k * b) for a, b in zip(batched, single, strict=True)]
    return {"batched": batched, "single": single, "ratios": ratios}


def run(args) -> dict:
    """Runs the benchmark; ``args`` carries ``rounds`` and ``seconds``."""
    import keras
    import tensorflow as tf

    from shopee_tpu.inference.tta import predict, tta_step

    rounds = max(int(getattr(args, "rounds", None) or 5), 1)
    seconds = float(getattr(args, "seconds", None) or 3.0)
    k = len(VIEWS)
    keras.utils.set_random_seed(0)
    model, name = _model(IMAGE_SIZE)
    step_k, step_1 = tta_step(model, VIEWS), tta_step(model, ("identity",))

    # Warm up (trace both calls), then size a round so the one-view share of it
    # lasts about `seconds`.
    probe = photo_crops(BATCH, IMAGE_SIZE)
    for _ in range(2):
        step_k(probe), step_1(probe)
    start = time.perf_counter()
    step_1(probe)
    per_batch = time.perf_counter() - start
    n_batches = max(2, round(seconds / max(per_batch, 1e-6)))
    images = photo_crops(n_batches * BATCH, IMAGE_SIZE)
    batches = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    calls = _interleaved(step_k, step_1, batches, k, rounds)

    # End to end through predict() on a tf.data pipeline: whole passes alternate.
    ids = np.array([f"{i}.jpg" for i in range(len(images))])
    ds = tf.data.Dataset.from_tensor_slices((images, ids)).batch(BATCH).cache()
    for views in (VIEWS, ("identity",)):
        predict(model, ds, tta=views)

    def timed(views) -> float:
        start = time.perf_counter()
        predict(model, ds, tta=views)
        return 1.0 / (time.perf_counter() - start)  # alternate() wants rates

    passes = alternate(
        {"k": lambda: timed(VIEWS), "one": lambda: timed(("identity",))}, rounds
    )
    e2e = [
        (1 / a) / (k * (1 / b)) for a, b in zip(passes["k"], passes["one"], strict=True)
    ]

    med = lambda v: float(np.median(v))  # noqa: E731
    return {
        "bench": "predict",
        "model": name,
        "backend": keras.backend.backend(),
        "image_size": IMAGE_SIZE,
        "batch": BATCH,
        "images": len(images),
        "views": list(VIEWS),
        "k": k,
        "rounds": rounds,
        "seconds_batched_k_views_median": round(med(calls["batched"]), 4),
        "seconds_one_view_median": round(med(calls["single"]), 4),
        "seconds_k_times_one_view_median": round(k * med(calls["single"]), 4),
        "images_per_sec_one_view_median": round(len(images) / med(calls["single"]), 2),
        "view_images_per_sec_batched_median": round(
            k * len(images) / med(calls["batched"]), 2
        ),
        "ratio_batched_over_k_single_median": round(med(calls["ratios"]), 4),
        "ratios": [round(r, 4) for r in calls["ratios"]],
        "end_to_end_predict_ratio_median": round(med(e2e), 4),
        "end_to_end_ratios": [round(r, 4) for r in e2e],
        "target": "<= 1.1",
        "meets_target": bool(med(calls["ratios"]) <= 1.1),
    }
