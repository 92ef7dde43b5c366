"""The training pipeline flips each image as it is decoded: every training image is
a stored image or its exact mirror, about half of them mirrored, eagerly and in
``tf.data``."""

from __future__ import annotations

import numpy as np

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.augment import flip_image
from shopee_tpu.data.read.pipeline import load_dataset


def _marked() -> np.ndarray:
    """A uint8 image whose one bright pixel shows where a flip moved it."""
    image = np.zeros((6, 8, 3), np.uint8)
    image[1, 2] = 255
    return image


def test_flip_image_mirrors_exactly_and_draws_per_seed():
    image = _marked()
    outcomes = set()
    for i in range(64):
        out = flip_image(image, AugmentConfig(flip_lr=True, flip_ud=True), [7, i])
        out = out.numpy()
        assert out.dtype == np.uint8 and out.shape == image.shape
        y, x = np.argwhere(out[..., 0] == 255)[0]
        assert (y, x) in {(1, 2), (1, 5), (4, 2), (4, 5)}  # (h-1-1, w-1-2) mirrors
        outcomes.add((int(y), int(x)))
        # The same seed gives the same draw.
        again = flip_image(image, AugmentConfig(flip_lr=True, flip_ud=True), [7, i])
        np.testing.assert_array_equal(again.numpy(), out)
    assert len(outcomes) == 4  # none, left-right, up-down and both all occur
    lr_only = {
        tuple(
            np.argwhere(flip_image(image, AugmentConfig(), [3, i]).numpy()[..., 0])[0]
        )
        for i in range(32)
    }
    assert lr_only == {(1, 2), (1, 5)}  # the default flips left-right only


def test_training_images_are_stored_images_or_their_mirrors(digits_records):
    stored = np.concatenate(
        [
            x.numpy()
            for x, _ in load_dataset(
                digits_records["train"], image_size=32, batch_size=64, training=False
            )
        ]
    )
    plain = {x.tobytes(): i for i, x in enumerate(stored)}
    mirror = {x[:, ::-1].tobytes(): i for i, x in enumerate(stored)}
    symmetric = set(plain) & set(mirror)
    ds = load_dataset(
        digits_records["train"],
        image_size=32,
        batch_size=32,
        training=True,
        augment=AugmentConfig(),
        seed=0,
    )
    flipped = kept = 0
    for x, _ in ds.take(6):
        assert x.dtype.name == "uint8" and x.shape == (32, 32, 32, 3)
        for image in x.numpy():
            key = image.tobytes()
            assert key in plain or key in mirror, "neither stored nor its mirror"
            if key in symmetric:
                continue
            flipped += key in mirror
            kept += key in plain
    assert flipped + kept >= 150
    assert 0.3 < flipped / (flipped + kept) < 0.7

    # Flips off: every image is a stored one, never mirrored.
    ds = load_dataset(
        digits_records["train"],
        image_size=32,
        batch_size=32,
        training=True,
        augment=AugmentConfig(flip_lr=False),
        seed=0,
    )
    for x, _ in ds.take(2):
        assert all(i.tobytes() in plain for i in x.numpy())
