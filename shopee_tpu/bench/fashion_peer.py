"""The peer of ``bench fashion``: the Fashion-MNIST script a competent Keras user
writes.

The arrays as ``keras.datasets.fashion_mnist.load_data()`` returns them, one grey
channel; a VGG-style CNN (three stages of two 3x3 convolutions with batch norm
and ReLU, max pooling between them, global average pooling, dropout, softmax);
``RandomFlip("horizontal")`` and ``RandomTranslation(0.1, 0.1)`` inside the
model; ``AdamW`` on ``CosineDecay`` with one warm-up epoch; label smoothing 0.1;
batch 128 on all 60,000 training images; the final weights; flip TTA on the
test images. Its peak learning rate and width were chosen on the tuning split
(docs/benchmarks.md), as ours were.
"""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np

from shopee_tpu.bench.peer import StopBefore, compile_peer

BATCH = 128


def peer_model(keras, num_classes: int, *, side: int = 28, width: int = 32):
    """The VGG-style CNN, its augmentation and rescaling inside."""
    layers = keras.layers
    inputs = keras.Input((side, side, 1))
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.RandomTranslation(0.1, 0.1, fill_mode="constant")(x)
    x = layers.Rescaling(1 / 255)(x)
    for stage in range(3):
        for _ in range(2):
            x = layers.Conv2D(width << stage, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        if stage < 2:
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def run_fashion_peer(
    arrays,
    *,
    seed: int,
    epochs: int,
    learning_rate: float,
    width: int = 32,
    time_limit: float | None = None,
) -> dict:
    """Trains the peer on the training arrays and scores the test arrays.

    Args:
        arrays: A function returning ``(x_train, y_train, x_test, y_test)``
            (uint8 ``N x H x W`` images, integer labels); called inside the
            timed part, as a script reads its data.
        seed: Seed of the weights, the shuffling and the augmentation.
        epochs: Epochs to train.
        learning_rate: The peak of the cosine.
        width: Filters of the first stage (doubled at each of the next two).
        time_limit: Seconds; ``fit`` stops before an epoch that would end later.
    """
    start, cpu = time.perf_counter(), time.process_time()
    x_train, y_train, x_test, y_test = arrays()
    classes = int(max(y_train.max(), y_test.max())) + 1
    keras.utils.set_random_seed(seed)
    model = peer_model(keras, classes, side=x_train.shape[1], width=width)
    epoch = len(x_train) // BATCH
    compile_peer(model, learning_rate, epochs * epoch, epoch)
    epoch_seconds = _EpochTimes(keras)
    history = model.fit(
        x_train[..., None],
        keras.utils.to_categorical(y_train, classes),
        batch_size=BATCH,
        epochs=epochs,
        shuffle=True,
        callbacks=[StopBefore(start, time_limit), epoch_seconds.callback],
        verbose=0,
    )
    done = len(history.history["loss"])
    test = x_test[..., None]
    plain = model.predict(test, batch_size=512, verbose=0)
    flipped = model.predict(test[:, :, ::-1], batch_size=512, verbose=0)
    return {
        "model": f"VGG-style CNN, width {width}",
        "test_accuracy": _accuracy(plain, y_test),
        "test_accuracy_flip_tta": _accuracy(plain + flipped, y_test),
        "wall_time_sec": round(time.perf_counter() - start, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "epochs": done,
        "epochs_planned": epochs,
        "train_images": len(x_train),
        # As ours reports it: the median epoch, the first (which traces) left out.
        "images_per_sec": round(
            (len(x_train) // BATCH) * BATCH / epoch_seconds.median, 1
        ),
    }


class _EpochTimes:
    """Each epoch's seconds (a callback for ``fit``)."""

    def __init__(self, keras):
        self.seconds: list[float] = []
        began = [0.0]

        def begin(epoch, logs=None):
            began[0] = time.perf_counter()

        def end(epoch, logs=None):
            self.seconds.append(time.perf_counter() - began[0])

        self.callback = keras.callbacks.LambdaCallback(
            on_epoch_begin=begin, on_epoch_end=end
        )

    @property
    def median(self) -> float:
        return statistics.median(self.seconds[1:] or self.seconds)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((np.argmax(probs, -1) == labels).mean()), 4)
