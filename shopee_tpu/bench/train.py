"""``shopee-tpu bench train``: training speed as a fraction of the machine's peak.

Three worker processes, one per setting (a process has one Keras backend, and JAX
fixes its device count when it starts), each build the models once and then wait:

- ``tensorflow``: our EfficientNet-B0 (builder + compile recipe) and plain
  ``keras.applications.EfficientNetB0`` with an Adam ``compile``, both with ``fit``;
- ``jax``: our model on the JAX backend, one device;
- ``jax_8_devices``: the same over 8 forced host devices with ``DataParallel`` (the
  stand-in for a v5e-8). **On CPU this measures the overhead of the 8-way split
  only, not TPU speed**: the 8 "devices" share the same cores. It also trains on
  the same pixels sent as float32 (``jax_8_devices_float32``, the pipeline's
  output before it sent uint8), and reports the bytes each sends to the devices
  a step.

Each worker also times a dense float32 matmul (the machine's reachable FLOP/s).
Rounds send one measurement (``--seconds`` long) to each contender in turn, the
order reversed every other round, so every figure sees the same machine load.

Reported, each as the median over rounds with its spread:

- ``fraction_of_peak``: model training FLOPs per image x images/s, divided by the
  best matmul FLOP/s measured in the run. Training FLOPs = 3 x the forward FLOPs
  (backward ~ 2 x forward), counted from the convolution and dense layers at
  2 FLOPs per multiply-add;
- ``ours_over_keras_applications``: our step against the plain one (TensorFlow).
  Our builder is layer for layer the keras.applications graph, so this ratio only
  shows what our compile recipe (label smoothing, schedule, metrics) costs;
- ``jax_8_devices_over_1``: the 8-device JAX rate over the 1-device one.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from shopee_tpu import connect
from shopee_tpu.bench import (
    Worker,
    photo_crops,
    ratios,
    round_orders,
    say,
    spread,
    timed_rate,
)
from shopee_tpu.config import OptimConfig

CLASSES = 10
# (backbone, keras.applications model, image size, batch, matmul side): measured
# and --quick settings (the quick one only exercises the code, in seconds: the
# tiny backbone, and MobileNet, the keras.applications model cheapest to trace).
FULL = ("efficientnet-b0", "EfficientNetB0", 128, 16, 2048)
QUICK = ("tiny-cnn", "MobileNet", 32, 8, 256)
WORKERS = {
    "tensorflow": {"KERAS_BACKEND": "tensorflow"},
    "jax": {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    },
    "jax_8_devices": {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    },
}


def forward_flops(model) -> int:
    """FLOPs of one image's forward pass through the model's convolutions and dense
    layers (2 per multiply-add); normalisation, activations and pooling, a few
    per cent of the total, are not counted."""
    import keras

    from shopee_tpu.models.layers import sublayers  # Keras

    total = 0
    for layer in sublayers(model):
        if not isinstance(
            layer,
            keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense,
        ):
            continue
        out = layer.output.shape  # (batch, ..., channels)
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        # Conv2D (kh, kw, cin/groups, cout), depthwise (kh, kw, cin, multiplier)
        # and Dense (cin, cout) kernels: each weight is one multiply-add per
        # output position.
        total += 2 * positions * int(np.prod(layer.kernel.shape))
    return total


# ---------------------------------------------------------------------------
# The worker process.


def _worker(name: str, quick: bool, seconds: float) -> None:
    """Builds the models of one setting, then answers ``ours``/``plain``/``peak``
    commands on stdin with one JSON line each, until ``quit``."""
    import keras
    import tensorflow as tf

    from shopee_tpu.models import build_model, compile_model

    backbone, applications, size, batch, side = QUICK if quick else FULL
    acc = connect(device="cpu", verbose=False)
    keras.utils.set_random_seed(0)
    # uint8 pixels, as load_dataset yields them.
    images = np.clip(np.round(photo_crops(64, size)), 0, 255).astype(np.uint8)
    labels = np.eye(CLASSES, dtype=np.float32)[np.arange(64) % CLASSES]

    def batches(pixels):
        ds = tf.data.Dataset.from_tensor_slices((pixels, labels)).repeat()
        return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    datasets = {"ours": batches(images), "plain": batches(images)}
    if name == "jax_8_devices":
        datasets["ours_float32"] = batches(images.astype(np.float32))

    models = {}
    with acc.scope():
        models["ours"] = build_model(backbone, CLASSES, input_size=size)
        compile_model(models["ours"], OptimConfig(), steps_per_epoch=100, epochs=10)
        if name == "tensorflow":
            plain = getattr(keras.applications, applications)(
                weights=None, input_shape=(size, size, 3), classes=CLASSES
            )
            plain.compile(
                optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"]
            )
            models["plain"] = plain
    if "ours_float32" in datasets:
        models["ours_float32"] = models["ours"]
    chunks = {}
    for key, model in models.items():
        ds = datasets[key]
        model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)  # trace, compile
        start = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
        per_step = (time.perf_counter() - start) / 2
        # fit() calls of about a second, so its per-call cost stays small.
        chunks[key] = max(1, min(50, round(1.0 / max(per_step, 1e-6))))

    matmul = _matmul(keras.backend.backend(), side)
    matmul()
    say(
        {
            "ready": name,
            "replicas": acc.replicas,
            "backend": keras.backend.backend(),
            "forward_flops": {k: forward_flops(m) for k, m in models.items()},
            "matmul_flops": 2 * side**3,
        }
    )
    for line in sys.stdin:
        what = line.strip()
        if what == "quit":
            break
        if what == "peak":
            rate = timed_rate(lambda: (matmul(), 1)[1], seconds) * 2 * side**3
        else:
            model, steps, ds = models[what], chunks[what], datasets[what]

            def fit_chunk(model=model, steps=steps, ds=ds) -> int:
                model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
                return steps * batch

            rate = timed_rate(fit_chunk, seconds)
        say({"what": what, "rate": rate})


def _matmul(backend: str, side: int):
    """A function running one ``side`` x ``side`` float32 matmul to completion."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((side, side), dtype=np.float32) for _ in range(2))
    if backend == "jax":
        import jax

        fn = jax.jit(lambda x, y: (x @ y).sum())
        a, b = jax.device_put(a), jax.device_put(b)
        return lambda: fn(a, b).block_until_ready()
    import tensorflow as tf

    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    a, b = tf.constant(a), tf.constant(b)
    return lambda: fn(a, b).numpy()


# ---------------------------------------------------------------------------
# The parent: start the workers, alternate rounds, report.


def _start(name: str, quick: bool, seconds: float) -> Worker:
    code = (
        "from shopee_tpu.bench.train import _worker;"
        f"_worker({name!r}, {quick!r}, {seconds!r})"
    )
    return Worker(name, code, WORKERS[name])


def run(args) -> dict:
    """Runs the benchmark; ``args`` may carry ``rounds``, ``seconds`` and ``quick``."""
    quick = bool(getattr(args, "quick", False))
    backbone, applications, size, batch, side = QUICK if quick else FULL
    rounds = max(int(getattr(args, "rounds", None) or (2 if quick else 5)), 1)
    seconds = float(getattr(args, "seconds", None) or (0.3 if quick else 10.0))
    workers = {name: _start(name, quick, seconds) for name in WORKERS}
    try:
        ready = {name: w.read() for name, w in workers.items()}
        contenders = [("tensorflow", "ours"), ("tensorflow", "plain")]
        contenders += [("jax", "ours"), ("jax_8_devices", "ours")]
        contenders += [("jax_8_devices", "ours_float32")]
        contenders += [(name, "peak") for name in WORKERS]
        rates = {c: [] for c in contenders}
        for order in round_orders(contenders, rounds):
            for name, what in order:
                rates[(name, what)].append(float(workers[name].ask(what)["rate"]))
    finally:
        for w in workers.values():
            w.close()

    flops = ready["tensorflow"]["forward_flops"]
    train_flops = {k: 3 * v for k, v in flops.items()}
    # The machine's peak: per round, the best matmul rate of any backend.
    peak = [max(v) for v in zip(*(rates[(n, "peak")] for n in WORKERS), strict=True)]
    img = {
        "tensorflow": rates[("tensorflow", "ours")],
        "tensorflow_keras_applications": rates[("tensorflow", "plain")],
        "jax": rates[("jax", "ours")],
        "jax_8_devices": rates[("jax_8_devices", "ours")],
        "jax_8_devices_float32": rates[("jax_8_devices", "ours_float32")],
    }

    # Per step: the images (uint8 or float32 pixels) and the float32 one-hot labels.
    pixels, label_bytes = batch * size * size * 3, batch * CLASSES * 4
    moved = {"uint8": pixels + label_bytes, "float32": 4 * pixels + label_bytes}

    def fraction(key: str) -> list[float]:
        per_image = train_flops["plain" if "keras" in key else "ours"]
        return [r * per_image / p for r, p in zip(img[key], peak, strict=True)]

    return {
        "bench": "train",
        "model": backbone,
        "keras_applications": applications,
        "image_size": size,
        "batch_size": batch,
        "rounds": rounds,
        "seconds_per_contender": seconds,
        "replicas": {n: r["replicas"] for n, r in ready.items()},
        "forward_flops_per_image": flops,
        "training_flops": "3 x forward, convolutions and dense layers, 2 per MAC",
        "img_per_sec": {k: spread(v, 2) for k, v in img.items()},
        "matmul_gflops_per_sec": {
            n: spread([r / 1e9 for r in rates[(n, "peak")]], 1) for n in WORKERS
        },
        "matmul_side": side,
        "fraction_of_peak": {k: spread(fraction(k), 5) for k in img},
        "ours_over_keras_applications": spread(
            ratios(img["tensorflow"], img["tensorflow_keras_applications"])
        ),
        "jax_over_tensorflow": spread(ratios(img["jax"], img["tensorflow"])),
        "jax_8_devices_over_1": spread(ratios(img["jax_8_devices"], img["jax"])),
        "bytes_to_device_per_step": moved,
        "jax_8_devices_uint8_over_float32": spread(
            ratios(img["jax_8_devices"], img["jax_8_devices_float32"])
        ),
        "note": (
            "jax_8_devices runs on 8 forced host devices of the same CPU: it "
            "measures the overhead of the 8-way split only, not TPU speed"
        ),
    }
