"""The random resized crop, checked against an independent reference (scipy's
bilinear ``map_coordinates`` at the same boxes), eagerly and inside tf.data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.augment import (
    augment_batch,
    random_resized_crop,
    resized_crop_boxes,
)


@pytest.fixture(scope="module")
def photos():
    """Four real 40x48 photo crops (scikit-image's astronaut and coffee)."""
    from PIL import Image
    from skimage import data

    out = []
    for image in (data.astronaut(), data.coffee()):
        for top in (0, 150):
            crop = Image.fromarray(image[top : top + 200, 100:340])
            out.append(np.asarray(crop.resize((48, 40)), np.float32))
    return np.stack(out)


def _reference(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Bilinear crop-and-resize: output pixel i of a box [y0, x0, y1, x1] samples
    the input at y0 (h - 1) + i (y1 - y0) (h - 1) / (h - 1), likewise for x."""
    b, h, w, c = images.shape
    out = np.empty_like(images)
    for k in range(b):
        y0, x0, y1, x1 = boxes[k]
        ys = np.linspace(y0 * (h - 1), y1 * (h - 1), h)
        xs = np.linspace(x0 * (w - 1), x1 * (w - 1), w)
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        for ch in range(c):
            out[k, ..., ch] = ndimage.map_coordinates(
                images[k, ..., ch], [grid_y, grid_x], order=1, mode="nearest"
            )
    return out


def test_crops_equal_the_reference_at_the_same_boxes(photos):
    seed = np.array([3, 4], np.int64)
    out = random_resized_crop(photos, 0.2, 4 / 3, seed=seed).numpy()
    boxes = resized_crop_boxes(seed, len(photos), 0.2, 4 / 3).numpy()
    np.testing.assert_allclose(out, _reference(photos, boxes), atol=1e-3)
    assert not np.allclose(out, photos, atol=1)


def test_boxes_stay_inside_and_follow_area_and_aspect():
    boxes = resized_crop_boxes(np.array([0, 1]), 4000, 0.25, 4 / 3).numpy()
    y0, x0, y1, x1 = boxes.T
    h, w = y1 - y0, x1 - x0
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 1 + 1e-6).all()
    assert (x1 <= 1 + 1e-6).all()
    # Clipping a side to the image can only shrink the area by the aspect factor.
    assert (h * w >= 0.25 * 3 / 4 - 1e-6).all() and (h * w <= 1 + 1e-6).all()
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # Without an aspect change the area is uniform in [min_area, 1].
    square = resized_crop_boxes(np.array([5, 6]), 4000, 0.25, 1.0).numpy()
    area = (square[:, 2] - square[:, 0]) * (square[:, 3] - square[:, 1])
    assert area.min() >= 0.25 - 1e-6 and abs(area.mean() - 0.625) < 0.01


def test_the_whole_box_is_the_identity_and_leaves_other_draws_alone(photos):
    flips = AugmentConfig(flip_lr=True)
    whole = flips.replace(resized_crop=1.0, crop_aspect=1.0)
    seed = np.array([7, 8], np.int64)
    np.testing.assert_allclose(
        augment_batch(photos, whole, seed).numpy(),
        augment_batch(photos, flips, seed).numpy(),
        atol=1e-3,
    )


def test_inside_tf_data_uint8_and_seeded(photos):
    import tensorflow as tf

    cfg = AugmentConfig(flip_lr=True, resized_crop=0.3, saturation=0.2)
    batch = photos.astype(np.uint8)
    ds = tf.data.Dataset.from_tensors(batch).map(
        lambda x: augment_batch(x, cfg, tf.constant([1, 2], tf.int64))
    )
    (inside,) = list(ds.as_numpy_iterator())
    eager = augment_batch(batch, cfg, np.array([1, 2], np.int64)).numpy()
    assert inside.dtype == np.uint8 and inside.shape == batch.shape
    np.testing.assert_array_equal(inside, eager)
    other = augment_batch(batch, cfg, np.array([1, 3], np.int64)).numpy()
    assert not np.array_equal(other, eager)
