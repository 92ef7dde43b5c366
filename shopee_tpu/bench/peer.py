"""The peer of ``bench accuracy``: what a competent Keras user writes in ~30 lines.

It reads the same JPEG files as ours with ``image_dataset_from_directory``, keeps a
tenth of them for validation, augments with ``Random*`` layers (flip, rotation,
zoom, contrast), trains AdamW on a ``CosineDecay`` with warm-up and label smoothing
0.1, keeps the best epoch by validation accuracy, and scores the test crops plain
and with flip TTA. From scratch it trains ``keras.applications.EfficientNetB0``;
pretrained it fine-tunes the same ImageNet EfficientNet-Lite0 as ours (read by our
loader, which a user would need too), BatchNorm in inference mode as the Keras
fine-tuning guide does.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pandas as pd

from shopee_tpu.models import build_model

BATCH = 32
WARMUP_EPOCHS = 1


def _test_labels(task: dict) -> np.ndarray:
    """The test labels in file-name order, the order keras lists the files in."""
    truth = pd.read_csv(task["test_labels_csv"], dtype=str).sort_values("filename")
    return truth.category.astype(int).to_numpy()


def _backbone(keras, pretrained: bool, size: int, application: str):
    if pretrained:
        return build_model(
            "efficientnet-lite0",
            1,
            include_top=False,
            weights="imagenet",
            input_size=size,
        )
    return getattr(keras.applications, application)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
    )


def _model(keras, task: dict, pretrained: bool, application: str):
    size, n = int(task["image_size"]), int(task["classes"])
    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.05),
            keras.layers.RandomZoom(0.15),
            keras.layers.RandomContrast(0.2),
        ]
    )
    inputs = keras.Input((size, size, 3))
    backbone = _backbone(keras, pretrained, size, application)
    x = backbone(augment(inputs), training=False if pretrained else None)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(n, activation="softmax")(x))


def run_peer(
    task: dict,
    *,
    seed: int,
    pretrained: bool,
    epochs: int,
    learning_rate: float,
    time_limit: float | None = None,
    application: str = "EfficientNetB0",
) -> dict:
    """Trains and scores the peer on ``task``; returns its accuracies and times."""
    import keras
    import tensorflow as tf

    start, cpu = time.perf_counter(), time.process_time()
    size = int(task["image_size"])
    keras.utils.set_random_seed(seed)
    train_ds, valid_ds = keras.utils.image_dataset_from_directory(
        task["train_images"],
        image_size=(size, size),
        batch_size=BATCH,
        label_mode="categorical",
        validation_split=0.1,
        subset="both",
        seed=seed,
        verbose=False,
    )
    model = _model(keras, task, pretrained, application)
    compile_peer(keras, model, epochs * len(train_ds), len(train_ds), learning_rate)
    best = os.path.join(tempfile.mkdtemp(prefix="peer-"), "best.weights.h5")
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            best, monitor="val_accuracy", save_best_only=True, save_weights_only=True
        ),
        stop_at(keras, start, time_limit),
    ]
    history = model.fit(
        train_ds.prefetch(tf.data.AUTOTUNE),
        validation_data=valid_ds,
        epochs=epochs,
        callbacks=callbacks,
        verbose=0,
    )
    model.load_weights(best)
    labels = _test_labels(task)
    plain, flipped = _predict(keras, tf, model, task, size, labels)
    val = history.history["val_accuracy"]
    return {
        "model": "efficientnet-lite0 (ImageNet)" if pretrained else application,
        "test_accuracy": _accuracy(plain, labels),
        "test_accuracy_flip_tta": _accuracy(plain + flipped, labels),
        "wall_time_sec": round(time.perf_counter() - start, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "epochs": len(val),
        "best_epoch": int(np.argmax(val)) + 1,
        "best_val_accuracy": round(float(max(val)), 4),
    }


def compile_peer(keras, model, steps: int, epoch: int, learning_rate: float):
    """What a Keras user compiles with: ``AdamW`` (weight decay 0.05) on a
    ``CosineDecay`` over ``steps`` with ``WARMUP_EPOCHS`` of ``epoch`` steps of
    warm-up (at most half the steps), label smoothing 0.1, accuracy."""
    warmup = min(WARMUP_EPOCHS * epoch, steps // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=learning_rate, warmup_steps=warmup
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["accuracy"],
    )
    return model


def _predict(keras, tf, model, task: dict, size: int, labels: np.ndarray):
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
    return np.concatenate(plain), np.concatenate(flipped)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((np.argmax(probs, -1) == labels).mean()), 4)


def stop_at(keras, start: float, limit: float | None):
    """Stops ``fit`` before an epoch that would end past ``limit`` seconds from
    ``start`` (as long as the longest epoch so far)."""
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
