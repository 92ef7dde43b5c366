"""``shopee-tpu bench export``: the fine-tuned Lite0 in Keras against its exports.

1. **The model.** ``photo-lite0`` fine-tunes ImageNet EfficientNet-Lite0 on the
   photo task of ``bench accuracy`` (the ``final`` photographs, seed ``--seed``,
   default 0) at 224 px, Lite0's own size, on every training crop, as ``bench
   accuracy`` trains it (``run_ours``).
2. **Accuracy.** ``export`` writes LiteRT float32, float16 and int8 (calibrated
   on 300 training crops) and ONNX; each, reloaded in its runtime, classifies the
   held-out test crops, one view each, as the Keras model does: the accuracy
   lost is Keras's accuracy minus the export's, in points.
   ``--quick`` runs the code in seconds with tiny-cnn from random weights.
3. **Speed.** One worker process per thread count (1 and 2: TensorFlow fixes
   its thread pools when it starts) holds every contender: Keras (a compiled
   ``tf.function`` of the model, TensorFlow's intra-op threads set), LiteRT
   float32 / float16 / int8 (``num_threads``, XNNPACK) and onnxruntime
   (``intra_op_num_threads``). Each measurement gives the single-image latency
   (the median call over half of ``--seconds``, one image at a time, as an app
   classifies a photo) and the images per second of batches of 32 (the other
   half). Rounds visit every (threads, contender) pair, the order reversed every
   other round.

The goal: LiteRT int8 at least 3x Keras's single-image speed on the same thread
count (``int8_over_keras_single_image``: Keras's latency over int8's, per round),
at most 0.5 points of accuracy lost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

from shopee_tpu.bench import Worker, ratios, round_orders, say, spread
from shopee_tpu.bench.accuracy import SETTINGS, make_task, run_ours
from shopee_tpu.deploy.writer import export
from shopee_tpu.inference.exported import load_exported
from shopee_tpu.inference.files import list_images, read_image
from shopee_tpu.inference.run import load_run_model

SIZE, QUICK_SIZE = 224, 64
# --quick: tiny-cnn from random weights, so no frozen phase (freezing random
# features only costs a second trace of the step; train() warns about it).
QUICK_MODEL = ("model.backbone=tiny-cnn", "model.weights=null", "plan.freeze_epochs=0")
THREADS = (1, 2)
BATCH = 32
EXPORTS = {
    "litert_float32": ("litert", None),
    "litert_float16": ("litert", "float16"),
    "litert_int8": ("litert", "int8"),
    "onnx": ("onnx", None),
}
CONTENDERS = ("keras", *EXPORTS)
GOAL = {"int8_over_keras_single_image": 3.0, "accuracy_lost_points": 0.5}


def _worker(spec_json: str) -> None:
    """Loads every contender on ``threads`` threads, then answers a measurement
    (``--seconds`` long) per contender name on stdin, until ``quit``."""
    spec = json.loads(spec_json)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(1)

    model, _, _, size = load_run_model(spec["run"])
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    runners = {"keras": lambda x: call(tf.constant(x)).numpy()}
    for name in EXPORTS:
        runners[name] = load_exported(spec["exports"][name], threads=spec["threads"])
    images = np.load(spec["images"]).astype(np.float32)
    batch = np.resize(images, (BATCH, size, size, 3))
    for run in runners.values():  # trace, allocate, warm the caches
        run(images[:1]), run(batch), run(images[:1])
    say({"ready": spec["threads"]})
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        say(_measure(runners[name], images, batch, spec["seconds"]))


def _measure(run, images: np.ndarray, batch: np.ndarray, seconds: float) -> dict:
    """Single-image latency (median call) and batch throughput, half the time each."""
    run(images[:1])
    calls, i, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2 or len(calls) < 3:
        x = images[i % len(images)][None]
        t = time.perf_counter()
        run(x)
        calls.append(time.perf_counter() - t)
        i += 1
    run(batch)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds / 2 or n < 2 * BATCH:
        run(batch)
        n += BATCH
    elapsed = time.perf_counter() - start
    return {"latency_ms": 1e3 * float(np.median(calls)), "images_per_sec": n / elapsed}


def _fine_tune(out: str, seed: int, quick: bool) -> tuple[dict, dict]:
    """The photo task at the bench's size and ``photo-lite0`` trained on it."""
    size = QUICK_SIZE if quick else SIZE
    task = make_task(
        os.path.join(out, "task"), seed, split="final", size=size, quick=quick
    )
    # --quick exercises the code in seconds: tiny-cnn from random weights.
    sets = SETTINGS["pretrained"].quick_sets + QUICK_MODEL if quick else ()
    metrics = run_ours(task, out, seed=seed, preset="photo-lite0", sets=sets)
    return task, metrics


def _exports(out: str) -> dict:
    run, test = os.path.join(out, "run"), os.path.join(out, "records", "test")
    return {
        name: export(
            run,
            format,
            quantize=quantize,
            out=os.path.join(out, "exports", name),
            check=test,
            check_images=100_000,
            verbose=False,
        )
        for name, (format, quantize) in EXPORTS.items()
    }


def _speed(out, task, exports, rounds: int, seconds: float) -> dict:
    """Every contender on each thread count, alternating; results per round."""
    paths = [p for _, p in list_images(task["test_images"])][:64]
    size = exports["onnx"].contract["image_size"]
    images = os.path.join(out, "speed_images.npy")
    np.save(images, np.stack([read_image(p, size) for p in paths]))
    workers = {}
    try:
        for threads in THREADS:
            spec = {
                "threads": threads,
                "seconds": seconds,
                "run": os.path.join(out, "run"),
                "exports": {k: r.folder for k, r in exports.items()},
                "images": images,
            }
            code = f"from shopee_tpu.bench.export import _worker; _worker({json.dumps(spec)!r})"
            workers[threads] = Worker(f"{threads}-thread", code, {})
        for w in workers.values():
            w.read()
        pairs = [(t, c) for t in THREADS for c in CONTENDERS]
        results = {pair: [] for pair in pairs}
        for order in round_orders(pairs, rounds):
            for threads, name in order:
                results[(threads, name)].append(workers[threads].ask(name))
    finally:
        for w in workers.values():
            w.close()
    return results


def _label(threads: int) -> str:
    return f"{threads}_thread" + ("s" if threads > 1 else "")


def run(args) -> dict:
    """``args``: ``quick``, ``seed``, ``rounds``, ``seconds``, ``out``."""
    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", None) or 0)
    rounds = max(int(getattr(args, "rounds", None) or (2 if quick else 5)), 1)
    seconds = float(getattr(args, "seconds", None) or (0.3 if quick else 10.0))
    out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="bench-export-")
    task, fine_tune = _fine_tune(out, seed, quick)
    exports = _exports(out)
    results = _speed(out, task, exports, rounds, seconds)
    keras = {
        "accuracy": exports["onnx"].check["keras_accuracy"],
        "correct": exports["onnx"].check["keras_correct"],
    }
    accuracy = {"keras": keras}
    for name, result in exports.items():
        c = result.check
        accuracy[name] = {
            k: c[k]
            for k in ("exported_accuracy", "exported_correct", "accuracy_drop_points")
        }
        accuracy[name].update(
            top1_agreement=c["top1_agreement"], bytes=result.contract["bytes"]
        )
    report = {
        "bench": "export",
        "quick": quick,
        "model": exports["onnx"].contract["backbone"],
        "preset": "photo-lite0",
        "image_size": exports["onnx"].contract["image_size"],
        "seed": seed,
        "test_images": exports["onnx"].check["images"],
        "fine_tune": fine_tune,
        "accuracy": accuracy,
        "rounds": rounds,
        "seconds_per_contender": seconds,
        "batch_size": BATCH,
    }
    report.update(_figures(results))
    report["goal"] = _verdict(report)
    return report


def _figures(results: dict) -> dict:
    latency, rate, speedups = {}, {}, {}
    for threads in THREADS:
        key = _label(threads)
        per = {name: results[(threads, name)] for name in CONTENDERS}
        latency[key] = {
            n: spread([r["latency_ms"] for r in v], 3) for n, v in per.items()
        }
        rate[key] = {
            n: spread([r["images_per_sec"] for r in v], 2) for n, v in per.items()
        }
        keras = [r["latency_ms"] for r in per["keras"]]
        speedups[key] = {
            n: spread(ratios(keras, [r["latency_ms"] for r in per[n]]), 3)
            for n in EXPORTS
        }
    return {
        "latency_ms": latency,
        "images_per_sec": rate,
        "speedup_over_keras_single_image": speedups,
        "int8_over_keras_single_image": {
            k: v["litert_int8"] for k, v in speedups.items()
        },
    }


def _verdict(report: dict) -> dict:
    lost = report["accuracy"]["litert_int8"]["accuracy_drop_points"]
    speed = {k: v["median"] for k, v in report["int8_over_keras_single_image"].items()}
    fast = all(v >= GOAL["int8_over_keras_single_image"] for v in speed.values())
    small_loss = lost <= GOAL["accuracy_lost_points"]
    return {
        **GOAL,
        "int8_speedup_medians": speed,
        "int8_accuracy_lost_points": lost,
        "met": bool(fast and small_loss),
    }
