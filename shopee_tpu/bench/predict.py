"""``shopee-tpu bench predict``: K TTA views in one batched call against K passes.

Same model (our EfficientNet-B0, random weights), same images, same batches. A is
``predict(model, ds, tta=<K views>)``: every batch's K views are built on the device
and classified in one call. B is ``predict(model, ds, tta=("identity",))``, one view;
the reference for K views is K x B. Rounds alternate A and B; the figure is the
median of the per-round ratios ``time(A) / (K * time(B))``, target <= 1.1 (batched
TTA adds no overhead beyond the extra arithmetic).
"""

from __future__ import annotations

import time

import numpy as np

from shopee_tpu.bench import alternate

VIEWS = ("identity", "flip_lr", "flip_ud", "rot180")
IMAGE_SIZE = 96
BATCH = 16
CLASSES = 10
BACKBONE = "efficientnet-b0"


def _photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Real photo crops (scikit-learn's two sample photos), resized."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(size, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)
    return out


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


def run(args) -> dict:
    """Runs the benchmark; ``args`` carries ``rounds`` and ``seconds``."""
    import keras
    import tensorflow as tf

    from shopee_tpu.inference.tta import predict

    rounds = max(int(getattr(args, "rounds", None) or 5), 1)
    seconds = float(getattr(args, "seconds", None) or 3.0)
    keras.utils.set_random_seed(0)
    model, name = _model(IMAGE_SIZE)

    def dataset(n):
        images = _photos(n, IMAGE_SIZE)
        ids = np.array([f"{i}.jpg" for i in range(n)])
        return tf.data.Dataset.from_tensor_slices((images, ids)).batch(BATCH).cache()

    def timed(ds, views) -> float:
        start = time.perf_counter()
        predict(model, ds, tta=views)
        return time.perf_counter() - start

    # Warm up (trace both call shapes, fill the cache), then size one measurement
    # of the single view to about `seconds`.
    probe = dataset(2 * BATCH)
    timed(probe, VIEWS), timed(probe, ("identity",))
    per_image = timed(probe, ("identity",)) / (2 * BATCH)
    n = max(2, round(seconds / max(per_image, 1e-6) / BATCH)) * BATCH
    ds = dataset(n)
    timed(ds, VIEWS), timed(ds, ("identity",))
    # alternate() wants rates; report seconds per pass from them.
    rates = alternate(
        {
            "batched_k_views": lambda: 1.0 / timed(ds, VIEWS),
            "one_view": lambda: 1.0 / timed(ds, ("identity",)),
        },
        rounds,
    )
    k = len(VIEWS)
    batched = [1.0 / r for r in rates["batched_k_views"]]
    single = [1.0 / r for r in rates["one_view"]]
    ratios = [a / (k * b) for a, b in zip(batched, single, strict=True)]
    return {
        "bench": "predict",
        "model": name,
        "backend": keras.backend.backend(),
        "image_size": IMAGE_SIZE,
        "batch": BATCH,
        "images": n,
        "views": list(VIEWS),
        "k": k,
        "rounds": rounds,
        "seconds_batched_k_views_median": round(float(np.median(batched)), 4),
        "seconds_one_view_median": round(float(np.median(single)), 4),
        "seconds_k_times_one_view_median": round(k * float(np.median(single)), 4),
        "images_per_sec_one_view_median": round(n / float(np.median(single)), 2),
        "view_images_per_sec_batched_median": round(
            k * n / float(np.median(batched)), 2
        ),
        "ratio_batched_over_k_single_median": round(float(np.median(ratios)), 4),
        "ratios": [round(r, 4) for r in ratios],
        "target": "<= 1.1",
        "meets_target": bool(np.median(ratios) <= 1.1),
    }
