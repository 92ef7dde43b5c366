"""``shopee-tpu bench accuracy``: held-out accuracy on real photographs, against the
plain Keras model a user would write.

The task (``shopee_tpu.data.photos``): each class is one real photograph bundled
with scikit-image or scikit-learn; samples are random crops with scale, position
and flip jitter at 64 px; the test crops come from a band of every photograph that
no training crop touches. The task itself is drawn from the seed (edges, crops), so
each seed is a different split of different crops.

Both contenders read the same JPEG files:

* **peer**: ``image_dataset_from_directory`` + ``RandomFlip`` +
  ``keras.applications.EfficientNetB0(weights=None)`` + Adam 1e-3 + ``fit`` for 30
  epochs, scored plain and with flip TTA (the better of the two is compared);
* **ours**: ``shopee-tpu tfrecords`` + ``train`` with the ``photo`` preset +
  ``predict`` with its TTA, on the same wall-time budget: the peer runs first, and
  ours gets at most the wall time the peer took (``train(time_limit=...)``).
  Like the peer, ours trains on every training image (``data.valid_fraction=0``:
  no hold-out, the last epoch's EMA weights); a 1-shard hold-out would both take
  an eighth of the images away and pick the epoch on about half of the classes.

Each side's time covers everything after the task exists: reading or writing
records, training (with our run folder, plots and checkpoints) and predicting.
Wall time is the budget; CPU time (all threads of the process) is reported too,
as it is less disturbed by other jobs on a shared machine.
The goal is a gain of at least ``TARGET_GAIN`` over the peer in no more time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from shopee_tpu import fs
from shopee_tpu.config import RunConfig
from shopee_tpu.data.pipeline import load_dataset, read_ids_labels
from shopee_tpu.data.records import write_records_from_csv
from shopee_tpu.inference.tta import predict
from shopee_tpu.training import train

FULL = dict(classes=10, train_per_class=120, test_per_class=40, image_size=64)
QUICK = dict(classes=4, train_per_class=24, test_per_class=8, image_size=64)
PEER_EPOCHS = 30
PEER_BATCH = 32
TARGET_GAIN = 0.05


def make_task(out: str, seed: int, quick: bool = False) -> dict:
    """The photo task for ``seed`` in the Shopee layout under ``out``."""
    from shopee_tpu.data.photos import make_photo_dataset

    summary = os.path.join(out, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            return json.load(f)
    info = make_photo_dataset(out, seed=seed, **(QUICK if quick else FULL))
    fs.write_text(summary, json.dumps(info, indent=1))
    return info


def _test_labels(task: dict) -> tuple[list[str], np.ndarray]:
    """Test file names in sorted order (the order keras lists them) and labels."""
    import pandas as pd

    truth = pd.read_csv(task["test_labels_csv"], dtype=str).sort_values("filename")
    return list(truth.filename), truth.category.astype(int).to_numpy()


def run_peer(
    task: dict,
    *,
    seed: int,
    epochs: int = PEER_EPOCHS,
    time_limit: float | None = None,
    application: str = "EfficientNetB0",
) -> dict:
    """The plain Keras model a user writes; returns its test accuracies and time.

    ``application`` names the ``keras.applications`` model (``--quick`` swaps in a
    smaller one: it only exercises the code).
    """
    import keras
    import tensorflow as tf

    size, n = int(task["image_size"]), int(task["classes"])
    start, cpu = time.perf_counter(), time.process_time()
    keras.utils.set_random_seed(seed)
    train_ds = keras.utils.image_dataset_from_directory(
        task["train_images"],
        image_size=(size, size),
        batch_size=PEER_BATCH,
        label_mode="categorical",
        seed=seed,
        verbose=False,
    ).prefetch(tf.data.AUTOTUNE)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.RandomFlip("horizontal")(inputs)
    outputs = getattr(keras.applications, application)(
        weights=None, input_shape=(size, size, 3), classes=n
    )(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = _stop_at(start, time_limit)
    history = model.fit(train_ds, epochs=epochs, callbacks=[stop], verbose=0)
    names, labels = _test_labels(task)
    test_ds = keras.utils.image_dataset_from_directory(
        task["test_images"],
        labels=labels.tolist(),
        image_size=(size, size),
        batch_size=64,
        shuffle=False,
        verbose=False,
    )
    plain, flipped = [], []
    for images, _ in test_ds:
        plain.append(model.predict_on_batch(images))
        flipped.append(model.predict_on_batch(tf.reverse(images, axis=[2])))
    p, f = np.concatenate(plain), np.concatenate(flipped)
    seconds = time.perf_counter() - start
    return {
        "model": application,
        "test_accuracy": _accuracy(p, labels),
        "test_accuracy_flip_tta": _accuracy(p + f, labels),
        "wall_time_sec": round(seconds, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "epochs": len(history.history.get("loss", [])),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
    }


def run_ours(
    task: dict,
    out: str,
    *,
    seed: int,
    sets: tuple[str, ...] = (),
    preset: str = "photo",
    time_limit: float | None = None,
) -> dict:
    """Records, ``train`` with the preset, ``predict`` with its TTA; accuracy, time."""
    start, cpu = time.perf_counter(), time.process_time()
    records = os.path.join(out, "records")
    options = dict(image_size=None, resize="square", quality=95, workers=1, seed=0)
    write_records_from_csv(
        task["train_csv"],
        task["train_images"],
        os.path.join(records, "train"),
        shards=8,
        **options,
    )
    write_records_from_csv(
        task["test_labels_csv"],
        task["test_images"],
        os.path.join(records, "test"),
        shards=1,
        label_map=os.path.join(records, "train", "manifest.json"),
        **options,
    )
    cfg = RunConfig.preset(preset).override(
        f"data.train={os.path.join(records, 'train')}",
        f"seed={seed}",
        f"out_dir={os.path.join(out, 'run')}",
        "data.valid_fraction=0",  # the peer's training images, all of them
        *sets,
    )
    limit = None if time_limit is None else time_limit - (time.perf_counter() - start)
    result = train(cfg, time_limit=limit, verbose=0)
    size = result.model.input_shape[1]
    test = load_dataset(
        os.path.join(records, "test"),
        image_size=size,
        batch_size=64,
        training=False,
    )
    _, probs = predict(
        result.model, test, tta=cfg.predict.tta, reduce=cfg.predict.reduce
    )
    labels = read_ids_labels(os.path.join(records, "test"))["label"].to_numpy()
    seconds = time.perf_counter() - start
    m = result.metrics
    return {
        "test_accuracy": _accuracy(probs, labels),
        "wall_time_sec": round(seconds, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "epochs": m["epochs_completed"],
        "epochs_planned": m["epochs"],
        "stop_reason": m["stop_reason"],
        "train_images": m["train_images"],
    }


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((np.argmax(probs, -1) == labels).mean()), 4)


def _stop_at(start: float, limit: float | None):
    """A callback that stops ``fit`` before an epoch that would end past ``limit``
    seconds from ``start`` (as long as the longest epoch so far)."""
    import keras

    longest, began = [0.0], [0.0]

    def on_epoch_begin(epoch, logs=None):
        began[0] = time.perf_counter()

    def on_epoch_end(epoch, logs=None):
        now = time.perf_counter()
        longest[0] = max(longest[0], now - began[0])
        if limit is not None and now - start + longest[0] > limit:
            callback.model.stop_training = True

    callback = keras.callbacks.LambdaCallback(
        on_epoch_begin=on_epoch_begin, on_epoch_end=on_epoch_end
    )
    return callback


def run(args) -> dict:
    """``args``: ``quick``, ``seed``, ``budget`` (seconds, optional), ``out``."""
    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", None) or 0)
    budget = getattr(args, "budget", None)
    out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="bench-accuracy-")
    task = make_task(os.path.join(out, f"task-{seed}"), seed, quick)
    ours_sets: tuple[str, ...] = ()
    peer_epochs, application = PEER_EPOCHS, "EfficientNetB0"
    if quick:  # a smoke run: one epoch each of small models, one image size
        peer_epochs, application = 1, "MobileNetV3Small"
        ours_sets = (
            "epochs=1",
            "plan.images_seen=0",
            "plan.min_epochs=1",
            "model.backbone=tiny-cnn",
        )
    peer = run_peer(
        task,
        seed=seed,
        epochs=peer_epochs,
        time_limit=budget,
        application=application,
    )
    limit = float(budget) if budget else peer["wall_time_sec"]
    ours = run_ours(
        task,
        os.path.join(out, f"ours-{seed}"),
        seed=seed,
        sets=ours_sets,
        time_limit=limit,
    )
    peer_best = max(peer["test_accuracy"], peer["test_accuracy_flip_tta"])
    gain = round(ours["test_accuracy"] - peer_best, 4)
    return {
        "benchmark": "accuracy",
        "quick": quick,
        "seed": seed,
        "task": {
            "classes": task["classes"],
            "train_images": task["train"],
            "test_images": task["test"],
            "image_size": task["image_size"],
            "photos": list(task["class_names"].values()),
        },
        "budget_sec": round(limit, 1),
        "peer": peer,
        "ours": ours,
        "gain_vs_peer": gain,
        "time_ratio_ours_vs_peer": round(
            ours["wall_time_sec"] / max(peer["wall_time_sec"], 1e-9), 3
        ),
        "target_gain": TARGET_GAIN,
        "goal_met": bool(
            gain >= TARGET_GAIN and ours["wall_time_sec"] <= peer["wall_time_sec"]
        ),
    }
