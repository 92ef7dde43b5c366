"""Training augmentations that run in graph mode inside ``tf.data`` on any backend.

Per image (:func:`augment_image`): flips, one affine warp combining rotation,
shear, zoom and shift (``keras.ops.image.affine_transform``, a single resampling),
random crop, colour jitter and cutout. Per batch (:func:`mix_batch`): MixUp and
CutMix with soft labels. Each is switched on and tuned by
``shopee_tpu.config.AugmentConfig``; the default is a horizontal flip only.

``tf.data`` runs TensorFlow graphs whatever the Keras backend is, so with the JAX
backend the affine warp uses Keras's TensorFlow implementation of the same op (what
Keras's own preprocessing layers switch to inside ``tf.data``). Randomness is
stateless and seeded per image, so a given seed gives the same augmentation however
many threads run the map.

Images are float pixels in 0..255 (the model input contract).
"""

from __future__ import annotations

import math

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data._tf import tf as require_tensorflow

__all__ = ["augment_image", "mix_batch", "needs_mixing", "affine_ops"]


def affine_ops():
    """``keras.ops.image`` on the TF backend; Keras's TF image ops on any other.

    Inside ``tf.data`` tensors are TensorFlow graph tensors, which JAX or torch ops
    cannot take.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        return keras.ops.image
    from keras.src.backend.tensorflow import image as tf_image

    return tf_image


def _uniform(seed, low, high, shape=()):
    tf = require_tensorflow()
    return tf.random.stateless_uniform(shape, seed, low, high, dtype=tf.float32)


def _affine(x, cfg: AugmentConfig, seed):
    """One warp: output pixel -> source pixel = A (p - c) + c - t, A = R S / zoom."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 5)
    rot = _uniform(s[0], -cfg.rotate, cfg.rotate) * (math.pi / 180)
    shear = _uniform(s[1], -cfg.shear, cfg.shear) * (math.pi / 180)
    zoom = _uniform(s[2], 1 - cfg.zoom, 1 + cfg.zoom)
    h = tf.cast(tf.shape(x)[0], tf.float32)
    w = tf.cast(tf.shape(x)[1], tf.float32)
    tx = _uniform(s[3], -cfg.shift, cfg.shift) * w
    ty = _uniform(s[4], -cfg.shift, cfg.shift) * h
    cos, sin, tan = tf.cos(rot), tf.sin(rot), tf.tan(shear)
    a00, a01 = cos / zoom, (cos * tan - sin) / zoom
    a10, a11 = sin / zoom, (sin * tan + cos) / zoom
    cx, cy = (w - 1) / 2, (h - 1) / 2
    transform = tf.stack(
        [
            a00,
            a01,
            cx - a00 * cx - a01 * cy - tx,
            a10,
            a11,
            cy - a10 * cx - a11 * cy - ty,
            0.0,
            0.0,
        ]
    )
    return affine_ops().affine_transform(
        x, transform, interpolation="bilinear", fill_mode="nearest"
    )


def _random_crop(x, amount: float, seed):
    """Crops a random square-ratio box (side 1 - U(0, amount)) and resizes it back."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 3)
    side = 1 - _uniform(s[0], 0.0, amount)
    y0 = _uniform(s[1], 0.0, 1.0) * (1 - side)
    x0 = _uniform(s[2], 0.0, 1.0) * (1 - side)
    box = tf.stack([y0, x0, y0 + side, x0 + side])[None]
    size = tf.shape(x)[:2]
    out = tf.image.crop_and_resize(x[None], box, [0], size)[0]
    return tf.ensure_shape(out, x.shape)


def _colour(x, cfg: AugmentConfig, seed):
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 4)
    if cfg.brightness:
        x = x + _uniform(s[0], -cfg.brightness, cfg.brightness) * 255.0
    if cfg.contrast:
        x = tf.image.stateless_random_contrast(
            x, 1 - cfg.contrast, 1 + cfg.contrast, s[1]
        )
    if cfg.saturation or cfg.hue:
        # HSV conversions expect 0..1.
        y = tf.clip_by_value(x / 255.0, 0.0, 1.0)
        if cfg.saturation:
            y = tf.image.stateless_random_saturation(
                y, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, s[2]
            )
        if cfg.hue:
            y = tf.image.stateless_random_hue(y, min(cfg.hue, 0.5), s[3])
        x = y * 255.0
    return tf.clip_by_value(x, 0.0, 255.0)


def _box_mask(h, w, cy, cx, bh, bw):
    """Float mask [h, w, 1], 1 inside the box centred at (cy, cx) of size (bh, bw)."""
    tf = require_tensorflow()
    ys = tf.range(tf.cast(h, tf.float32))[:, None]
    xs = tf.range(tf.cast(w, tf.float32))[None, :]
    inside = (tf.abs(ys - cy) * 2 < bh) & (tf.abs(xs - cx) * 2 < bw)
    return tf.cast(inside, tf.float32)[..., None]


def _cutout(x, size: float, seed):
    """Zeroes a square of side ``size`` x image side at a random centre."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 2)
    h = tf.cast(tf.shape(x)[0], tf.float32)
    w = tf.cast(tf.shape(x)[1], tf.float32)
    side = size * tf.minimum(h, w)
    mask = _box_mask(h, w, _uniform(s[0], 0.0, h), _uniform(s[1], 0.0, w), side, side)
    return x * (1 - mask)


def augment_image(image, cfg: AugmentConfig, seed=None):
    """Augments one image ``[h, w, 3]`` as ``cfg`` says; shape and dtype are kept.

    Args:
        image: Pixels 0..255 (float or uint8), a tensor or array.
        cfg: Which augmentations, and how strong.
        seed: Shape ``[2]`` integer seed (e.g. one per element from
            ``tf.data.Dataset.random``); ``None`` draws one.

    Returns:
        The augmented image, same shape and dtype.
    """
    tf = require_tensorflow()
    image = tf.convert_to_tensor(image)
    dtype = image.dtype
    x = tf.cast(image, tf.float32)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    if cfg.flip_lr:
        x = tf.image.stateless_random_flip_left_right(x, seeds[0])
    if cfg.flip_ud:
        x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    if cfg.rotate or cfg.shear or cfg.zoom or cfg.shift:
        x = _affine(x, cfg, seeds[2])
    if cfg.random_crop:
        x = _random_crop(x, cfg.random_crop, seeds[3])
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        x = _colour(x, cfg, seeds[4])
    if cfg.cutout:
        x = _cutout(x, cfg.cutout, seeds[5])
    x = tf.ensure_shape(x, image.shape)
    if dtype.is_integer:
        return tf.cast(tf.clip_by_value(tf.round(x), dtype.min, dtype.max), dtype)
    return tf.cast(x, dtype)


def needs_mixing(cfg: AugmentConfig | None) -> bool:
    """True when MixUp or CutMix is on."""
    return cfg is not None and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mix_prob > 0


def _beta(seed, alpha: float, n):
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 2)
    g1 = tf.random.stateless_gamma([n], s[0], alpha)
    g2 = tf.random.stateless_gamma([n], s[1], alpha)
    return g1 / (g1 + g2)


def mix_batch(images, labels, cfg: AugmentConfig, seed=None):
    """MixUp or CutMix on a batch, with soft (mixed) one-hot labels.

    Each example is mixed with another of the same batch (a seeded permutation).
    When both are on, each batch gets one of them at random; ``cfg.mix_prob`` is the
    chance that a batch is mixed at all.

    Args:
        images: ``[b, h, w, c]`` float pixels.
        labels: ``[b, classes]`` float one-hot (or already soft) labels.
        cfg: ``mixup`` / ``cutmix`` Beta parameters and ``mix_prob``.
        seed: Shape ``[2]`` integer seed; ``None`` draws one.

    Returns:
        ``(images, labels)`` with the same shapes and dtypes.
    """
    tf = require_tensorflow()
    images = tf.convert_to_tensor(images)
    labels = tf.cast(labels, tf.float32)
    if not needs_mixing(cfg):
        return images, labels
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    b = tf.shape(images)[0]
    perm = tf.random.experimental.stateless_shuffle(tf.range(b), s[0])
    other_x, other_y = tf.gather(images, perm), tf.gather(labels, perm)
    x = tf.cast(images, tf.float32)
    ox = tf.cast(other_x, tf.float32)

    def mixup():
        lam = _beta(s[1], cfg.mixup, b)
        mx = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * ox
        return mx, lam

    def cutmix():
        lam = _beta(s[2], cfg.cutmix, b)
        h = tf.cast(tf.shape(x)[1], tf.float32)
        w = tf.cast(tf.shape(x)[2], tf.float32)
        cut = tf.sqrt(1 - lam)
        cy = tf.random.stateless_uniform([b], s[3], 0.0, 1.0) * h
        cx = tf.random.stateless_uniform([b], s[4], 0.0, 1.0) * w
        masks = tf.map_fn(
            lambda a: _box_mask(h, w, a[0], a[1], a[2] * h, a[2] * w),
            tf.stack([cy, cx, cut], axis=1),
        )
        mx = x * (1 - masks) + ox * masks
        # Labels follow the area actually pasted (the box may leave the image).
        lam = 1 - tf.reduce_mean(masks, axis=[1, 2, 3])
        return mx, lam

    if cfg.mixup > 0 and cfg.cutmix > 0:
        pick = tf.random.stateless_uniform([], s[5], 0.0, 1.0)
        mixed, lam = tf.cond(pick < 0.5, mixup, cutmix)
    else:
        mixed, lam = mixup() if cfg.mixup > 0 else cutmix()
    soft = lam[:, None] * labels + (1 - lam[:, None]) * tf.cast(other_y, tf.float32)
    apply = tf.random.stateless_uniform([], s[5] + 1, 0.0, 1.0) < cfg.mix_prob
    out_x = tf.where(apply, mixed, x)
    out_y = tf.where(apply, soft, labels)
    return tf.cast(tf.ensure_shape(out_x, images.shape), images.dtype), out_y
