"""The peer of ``bench accuracy``: what a competent Keras user writes in ~40 lines.

It reads the same JPEG files as ours with ``image_dataset_from_directory``, every
training crop (as ours), augments with ``Random*`` layers (flip, rotation, zoom,
contrast), trains AdamW on a ``CosineDecay`` with warm-up and label smoothing 0.1,
keeps its final weights (as ours keeps its last epoch), and scores the test crops
plain and with flip TTA.

From scratch it trains ``keras.applications.EfficientNetB0``. Pretrained, it
fine-tunes the same ImageNet EfficientNet-Lite0 as ours (read by our loader, which a
user would need too: Keras ships no Lite) the way the Keras transfer-learning guide
does (keras.io/guides/transfer_learning): the head first on the frozen backbone,
called with ``training=False`` so that BatchNorm stays in inference mode in both
phases; then every layer at a low learning rate.

The wall-time budget: :class:`StopBefore` ends ``fit`` before an epoch that would
not leave the prediction's ``reserve`` inside the budget, then the peer predicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from shopee_tpu.models import build_model

BATCH = 32
WARMUP_EPOCHS = 1


@dataclass(frozen=True)
class PeerRecipe:
    """The peer's choices (docs/benchmarks.md says how each was made).

    Attributes:
        application: ``keras.applications`` constructor, from scratch.
        epochs: Epochs of the whole run (both phases when pretrained).
        learning_rate: Peak learning rate of the cosine schedule (the
            all-layers phase, when pretrained).
        head_epochs: Pretrained: epochs of the head alone on the frozen backbone.
        head_learning_rate: Its constant learning rate (the guide's Adam default).
        steady_epoch_sec: Seconds of a steady epoch of the last phase, as a
            calibration run measured them: the budget guard's estimate of the
            next epoch until this run has timed a steady one itself.
    """

    application: str = "EfficientNetB0"
    epochs: int = 30
    learning_rate: float = 3e-3
    head_epochs: int = 0
    head_learning_rate: float = 1e-3
    steady_epoch_sec: float | None = None


def _test_labels(task: dict) -> np.ndarray:
    """The test labels in file-name order, the order keras lists the files in."""
    truth = pd.read_csv(task["test_labels_csv"], dtype=str).sort_values("filename")
    return truth.category.astype(int).to_numpy()


def _backbone(pretrained: bool, size: int, application: str):
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


def _model(task: dict, pretrained: bool, application: str):
    """``(model, backbone)``: augmentation, the backbone, dropout, the classifier."""
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
    backbone = _backbone(pretrained, size, application)
    x = backbone(augment(inputs), training=False if pretrained else None)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(n, activation="softmax")(x))
    return model, backbone


def compile_peer(model, learning_rate: float, steps: int = 0, epoch: int = 0):
    """What a Keras user compiles with: ``AdamW`` (weight decay 0.05), label
    smoothing 0.1, accuracy. With ``steps``: a ``CosineDecay`` to 0 over them that
    peaks at ``learning_rate`` after ``WARMUP_EPOCHS`` of ``epoch`` steps of warm-up
    (at most half the steps); else ``learning_rate`` throughout."""
    if steps:
        warmup = min(WARMUP_EPOCHS * epoch, steps // 2)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, steps - warmup, warmup_target=learning_rate, warmup_steps=warmup
        )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.05),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["accuracy"],
    )
    return model


def run_peer(
    task: dict,
    *,
    seed: int,
    pretrained: bool,
    recipe: PeerRecipe,
    budget: float | None = None,
    reserve: float = 0.0,
) -> dict:
    """Trains and scores the peer on ``task``; returns its accuracies and times.

    ``budget``: seconds of wall time from this call's start to the end of its
    prediction; ``reserve``: seconds kept for the prediction.
    """
    import tensorflow as tf

    start, cpu = time.perf_counter(), time.process_time()
    size = int(task["image_size"])
    keras.utils.set_random_seed(seed)
    files = keras.utils.image_dataset_from_directory(
        task["train_images"],
        image_size=(size, size),
        batch_size=BATCH,
        label_mode="categorical",
        seed=seed,
        verbose=False,
    )
    train_ds = files.prefetch(tf.data.AUTOTUNE)
    model, backbone = _model(task, pretrained, recipe.application)
    stop = StopBefore(start, budget, reserve, steady=recipe.steady_epoch_sec)
    epochs = []
    if pretrained and recipe.head_epochs:
        backbone.trainable = False
        compile_peer(model, recipe.head_learning_rate)
        head = model.fit(
            train_ds, epochs=recipe.head_epochs, callbacks=[stop], verbose=0
        )
        epochs.append(len(head.history["loss"]))
        backbone.trainable = True
    rest = recipe.epochs - recipe.head_epochs if pretrained else recipe.epochs
    trained = 0
    if rest > 0 and not stop.stopped:
        epoch = len(train_ds)
        compile_peer(model, recipe.learning_rate, rest * epoch, epoch)
        history = model.fit(train_ds, epochs=rest, callbacks=[stop], verbose=0)
        trained = len(history.history["loss"])
    epochs.append(trained)
    train_sec = time.perf_counter() - start
    labels = _test_labels(task)
    plain, flipped = _predict(tf, model, task, size, labels)
    wall = time.perf_counter() - start
    return {
        "model": "efficientnet-lite0 (ImageNet)" if pretrained else recipe.application,
        "test_accuracy": _accuracy(plain, labels),
        "test_accuracy_flip_tta": _accuracy(plain + flipped, labels),
        "wall_time_sec": round(wall, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "after_training_sec": round(wall - train_sec, 1),
        "setup_sec": round(train_sec - sum(stop.seconds), 2),
        "epoch_sec": [round(t, 2) for t in stop.seconds],
        "train_images": len(files.file_paths),
        "epochs": sum(epochs),
        "epochs_planned": recipe.epochs,
        "epochs_per_phase": epochs,
        "stop_reason": stop.reason,
    }


def _predict(tf, model, task: dict, size: int, labels: np.ndarray):
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


class StopBefore(keras.callbacks.Callback):
    """Stops ``fit`` so that the run ends within ``budget`` seconds of ``start``
    with ``reserve`` seconds left for what follows (the prediction).

    After each epoch it stops when the next one would eat into the reserve; mid-
    epoch it stops once the reserve is reached. The next epoch is expected to take
    as long as the longest of this ``fit`` after its first (which traces the step
    and so runs longer), or, before one is seen, as long as the longest first
    epoch: the all-layers phase after the head's is a new ``fit`` with a new trace
    and slower steps. As ``train()``'s time limit does. ``steady``: a steady
    epoch's seconds known from an earlier run (the calibration), the estimate
    until this ``fit`` has timed one itself: a traced first epoch runs several
    times as long as a steady one, and would stop the peer with budget left.
    ``clock`` is for tests.
    """

    def __init__(
        self,
        start: float,
        budget,
        reserve: float = 0.0,
        steady: float | None = None,
        clock=None,
    ):
        super().__init__()
        self.start, self.budget, self.reserve = start, budget, reserve
        self.clock = clock or time.perf_counter
        self.first = self.steady = 0.0
        self.known = steady or 0.0
        self.seconds: list[float] = []  # every epoch's, over every fit
        self.reason = None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def _left(self) -> float:
        return self.budget - self.reserve - (self.clock() - self.start)

    def on_train_begin(self, logs=None):
        self.steady, self.traced = 0.0, False

    def on_epoch_begin(self, epoch, logs=None):
        self.began = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        if self.budget is not None and not self.stopped and self._left() <= 0:
            self.model.stop_training = True
            self.reason = "budget reached mid-epoch"

    def on_epoch_end(self, epoch, logs=None):
        took = self.clock() - self.began
        self.seconds.append(took)
        if self.traced:
            self.steady = max(self.steady, took)
        else:
            self.first, self.traced = max(self.first, took), True
        if self.budget is None or self.stopped:
            return
        expected = self.steady or self.known or self.first
        if self._left() < expected:
            self.model.stop_training = True
            self.reason = f"the next epoch (~{expected:.0f}s) would not fit"
