"""``shopee-tpu bench predict``: how TTA groups its K views, against K passes.

Same model (our EfficientNet-B0, random weights), same images, same batches. Three
contenders classify every batch with K = 4 views:

- ``batched``: all K views in one compiled call (``views_per_call=None``);
- ``per_view``: one view per call through one shared compiled one-view call
  (``views_per_call=1``);
- ``k_single``: the reference, K calls of the plain one-view step on the batch.

Each batch goes through the three back to back, the order rotating from batch to
batch and round to round, so other processes on a shared machine weigh on all alike.
A round lasts about ``--seconds`` per contender (sized from a probe). Per round, the
figure of a strategy is ``time(strategy) / time(k_single)``; the medians and spreads
over rounds are reported, with the grouping ``predict`` chooses on this device
(``views_per_call="auto"``) and its ratio under ``ratio_chosen_over_k_single_median``
(target <= 1.1; on CPU the aim is <= 1.0). Whole ``predict()`` passes over a
``tf.data`` pipeline, the chosen grouping against K one-view passes, give the
end-to-end ratio. ``cpu_seconds_ratios`` give the same ratios in CPU seconds: the
work each grouping does, which a busy machine disturbs less than wall time.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from shopee_tpu.bench import photo_crops, ratios, round_orders, spread
from shopee_tpu.inference.tta import (
    auto_views_per_call,
    device_kind,
    predict,
    tta_step,
)

VIEWS = ("identity", "flip_lr", "flip_ud", "rot180")
CLASSES = 10
# (backbone, image size, batch): the full setting and the --quick one.
FULL = ("efficientnet-b0", 96, 16)
QUICK = ("efficientnet-phi-6", 32, 8)


def _model(backbone: str, size: int):
    from shopee_tpu.models import build_model

    return build_model(backbone, CLASSES, input_size=size)


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _interleaved(steps: dict, batches, rounds: int):
    """Per round, every batch through every contender, the order rotating by batch
    and by round; returns each contender's wall and CPU seconds per round."""
    names = list(steps)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        used = dict.fromkeys(names, 0.0)
        for i, x in enumerate(batches):
            shift = (i + r) % len(names)
            for name in names[shift:] + names[:shift]:
                start, c = time.perf_counter(), _cpu_seconds()
                steps[name](x)
                spent[name] += time.perf_counter() - start
                used[name] += _cpu_seconds() - c
        for n in names:
            wall[n].append(spent[n])
            cpu[n].append(used[n])
    return wall, cpu


def _steps(model, k: int) -> dict:
    """The three contenders, each classifying a batch with the K views."""
    batched = tta_step(model, VIEWS, views_per_call=None)
    per_view = tta_step(model, VIEWS, views_per_call=1)
    one = tta_step(model, ("identity",))

    def k_single(x):
        for _ in range(k):
            one(x)

    return {"batched": batched, "per_view": per_view, "k_single": k_single}


def _round_images(steps: dict, batch: int, size: int, seconds: float):
    """Warms every contender up (traces every call), then makes enough images for
    each contender's share of a round to last about ``seconds``."""
    probe = photo_crops(batch, size)
    for step in steps.values():
        step(probe), step(probe)
    start = time.perf_counter()
    steps["k_single"](probe)
    per_batch = time.perf_counter() - start
    n_batches = max(2, int(np.ceil(seconds / max(per_batch, 1e-6))))
    return photo_crops(n_batches * batch, size)


def _end_to_end(tf, model, images, batch: int, k: int, rounds: int) -> dict:
    """Whole predict() passes with the chosen grouping against K passes of
    predict() with one view, alternating; returns each side's seconds per round."""
    ids = np.array([f"{i}.jpg" for i in range(len(images))])
    ds = tf.data.Dataset.from_tensor_slices((images, ids)).batch(batch).cache()
    predict(model, ds, tta=VIEWS), predict(model, ds, tta=("identity",))

    def timed_pass(name: str) -> float:
        start = time.perf_counter()
        if name == "chosen":
            predict(model, ds, tta=VIEWS)
        else:
            for _ in range(k):
                predict(model, ds, tta=("identity",))
        return time.perf_counter() - start

    passes = {"chosen": [], "k_passes": []}
    for order in round_orders(list(passes), rounds):
        for name in order:
            passes[name].append(timed_pass(name))
    return passes


def run(args) -> dict:
    """Runs the benchmark; ``args`` may carry ``rounds``, ``seconds`` and ``quick``."""
    import keras
    import tensorflow as tf

    quick = bool(getattr(args, "quick", False))
    backbone, size, batch = QUICK if quick else FULL
    rounds = max(int(getattr(args, "rounds", None) or (2 if quick else 5)), 1)
    seconds = float(getattr(args, "seconds", None) or (0.2 if quick else 10.0))
    k = len(VIEWS)
    keras.utils.set_random_seed(0)
    model = _model(backbone, size)
    steps = _steps(model, k)
    chosen = "batched" if auto_views_per_call(model) is None else "per_view"
    images = _round_images(steps, batch, size, seconds)
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    secs, cpu = _interleaved(steps, batches, rounds)
    by_strategy = {
        name: ratios(secs[name], secs["k_single"]) for name in ("batched", "per_view")
    }
    # CPU seconds: the work each does, whatever share of a busy machine it got.
    by_cpu = {
        name: ratios(cpu[name], cpu["k_single"]) for name in ("batched", "per_view")
    }
    passes = _end_to_end(tf, model, images, batch, k, rounds)
    e2e = ratios(passes["chosen"], passes["k_passes"])

    med = lambda v: float(np.median(v))  # noqa: E731
    chosen_ratio = med(by_strategy[chosen])
    return {
        "bench": "predict",
        "model": backbone,
        "backend": keras.backend.backend(),
        "device_kind": device_kind(model),
        "chosen": chosen,
        "views_per_call_chosen": auto_views_per_call(model),
        "image_size": size,
        "batch": batch,
        "images": len(images),
        "views": list(VIEWS),
        "k": k,
        "rounds": rounds,
        "seconds_per_round": {n: spread(v) for n, v in secs.items()},
        "cpu_seconds_per_round": {n: spread(v) for n, v in cpu.items()},
        "images_per_sec_one_view_median": round(
            k * len(images) / med(secs["k_single"]), 2
        ),
        "ratio_batched_over_k_single_median": round(med(by_strategy["batched"]), 4),
        "ratio_per_view_over_k_single_median": round(med(by_strategy["per_view"]), 4),
        "ratio_chosen_over_k_single_median": round(chosen_ratio, 4),
        "ratios": {n: spread(v, 4) for n, v in by_strategy.items()},
        "cpu_seconds_ratios": {n: spread(v, 4) for n, v in by_cpu.items()},
        "end_to_end_chosen_over_k_passes_median": round(med(e2e), 4),
        "end_to_end_ratios": spread(e2e, 4),
        "end_to_end_seconds": {n: spread(v) for n, v in passes.items()},
        "target": "<= 1.1",
        "meets_target": bool(chosen_ratio <= 1.1),
    }
