"""Training augmentations that run in graph mode inside ``tf.data`` on any backend.

Per image, applied to whole batches at once (:func:`augment_batch`, or
:func:`augment_image` for one image): flips, an Inception-style random resized
crop, one affine warp combining rotation, shear, zoom and shift (a single
resampling, TensorFlow's ``ImageProjectiveTransformV3``), random crop, colour
jitter and cutout, each drawn independently for every image.
Per batch (:func:`mix_batch`): MixUp and CutMix with soft labels. Each is switched
on and tuned by ``shopee_tpu.config.AugmentConfig``; the default is a horizontal
flip only.

Working on batches matters for speed: ``tf.data`` pays a fixed cost per op and per
element, so one vectorised op over 64 images beats 64 small ones. ``tf.data`` runs
TensorFlow graphs whatever the Keras backend is, so with the JAX backend the affine
warp uses Keras's TensorFlow implementation of the same op (what Keras's own
preprocessing layers switch to inside ``tf.data``). Randomness is stateless and
seeded, so a given seed gives the same augmentation however many threads run.

Images are pixels in 0..255 (the model input contract), float or uint8.
"""

from __future__ import annotations

import math

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.decode import tf as require_tensorflow

__all__ = [
    "augment_batch",
    "augment_image",
    "flip_image",
    "flip_by_bits",
    "mix_batch",
    "needs_float",
    "needs_mixing",
    "random_resized_crop",
    "resized_crop_boxes",
]


def _uniform(seed, low, high, n):
    """``n`` uniform floats in [low, high)."""
    tf = require_tensorflow()
    return tf.random.stateless_uniform([n], seed, low, high, dtype=tf.float32)


def _col(v):
    """[b] -> [b, 1, 1, 1] for broadcasting over images."""
    return v[:, None, None, None]


def _affine(x, cfg: AugmentConfig, seed):
    """One warp per image: output p -> source A (p - c) + c - t, A = R S / zoom."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 5)
    b = tf.shape(x)[0]
    rot = _uniform(s[0], -cfg.rotate, cfg.rotate, b) * (math.pi / 180)
    shear = _uniform(s[1], -cfg.shear, cfg.shear, b) * (math.pi / 180)
    zoom = _uniform(s[2], 1 - cfg.zoom, 1 + cfg.zoom, b)
    h = tf.cast(tf.shape(x)[1], tf.float32)
    w = tf.cast(tf.shape(x)[2], tf.float32)
    tx = _uniform(s[3], -cfg.shift, cfg.shift, b) * w
    ty = _uniform(s[4], -cfg.shift, cfg.shift, b) * h
    cos, sin, tan = tf.cos(rot), tf.sin(rot), tf.tan(shear)
    a00, a01 = cos / zoom, (cos * tan - sin) / zoom
    a10, a11 = sin / zoom, (sin * tan + cos) / zoom
    cx, cy = (w - 1) / 2, (h - 1) / 2
    zeros = tf.zeros_like(a00)
    transforms = tf.stack(
        [
            a00,
            a01,
            cx - a00 * cx - a01 * cy - tx,
            a10,
            a11,
            cy - a10 * cx - a11 * cy - ty,
            zeros,
            zeros,
        ],
        axis=1,
    )
    # The op behind keras.ops.image.affine_transform on TensorFlow, called
    # directly: inside tf.data the tensors are TensorFlow's whatever Keras's
    # backend, and keras.ops would hand them to JAX there.
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )
    return tf.ensure_shape(warped, x.shape)


def _random_crop(x, amount: float, seed):
    """Crops a random box (side 1 - U(0, amount)) per image and resizes it back."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 3)
    b = tf.shape(x)[0]
    side = 1 - _uniform(s[0], 0.0, amount, b)
    y0 = _uniform(s[1], 0.0, 1.0, b) * (1 - side)
    x0 = _uniform(s[2], 0.0, 1.0, b) * (1 - side)
    boxes = tf.stack([y0, x0, y0 + side, x0 + side], axis=1)
    return tf.image.crop_and_resize(x, boxes, tf.range(b), tf.shape(x)[1:3])


def resized_crop_boxes(seed, n, min_area: float, aspect: float = 4 / 3):
    """``n`` random boxes ``[y0, x0, y1, x1]`` in 0..1 for a random resized crop.

    As Inception's crop: the area fraction is uniform in ``[min_area, 1]`` and the
    aspect ratio (width / height) log-uniform in ``[1 / aspect, aspect]``. Sides
    longer than the image are clipped to it (in place of Inception's rejection
    loop, which does not vectorise); the position is uniform over what is left.

    Args:
        seed: Shape ``[2]`` integer seed.
        n: Number of boxes (a scalar, may be a tensor).
        min_area: Smallest area fraction, in (0, 1].
        aspect: Largest aspect-ratio change, >= 1.
    """
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 4)
    area = _uniform(s[0], min_area, 1.0, n)
    log_ratio = _uniform(s[1], -math.log(aspect), math.log(aspect), n)
    ratio = tf.exp(log_ratio)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    y0 = _uniform(s[2], 0.0, 1.0, n) * (1 - h)
    x0 = _uniform(s[3], 0.0, 1.0, n) * (1 - w)
    return tf.stack([y0, x0, y0 + h, x0 + w], axis=1)


def random_resized_crop(images, min_area: float, aspect: float = 4 / 3, seed=None):
    """Crops a random box per image (:func:`resized_crop_boxes`) and resizes it
    back to the input size, bilinearly. Float ``[b, h, w, c]`` in, float out."""
    tf = require_tensorflow()
    x = tf.convert_to_tensor(images)
    b = tf.shape(x)[0]
    boxes = resized_crop_boxes(_seed(seed), b, min_area, aspect)
    out = tf.image.crop_and_resize(
        tf.cast(x, tf.float32), boxes, tf.range(b), tf.shape(x)[1:3]
    )
    return tf.ensure_shape(out, x.shape)


def _colour(x, cfg: AugmentConfig, seed):
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 4)
    b = tf.shape(x)[0]
    if cfg.brightness:
        x = x + _col(_uniform(s[0], -cfg.brightness, cfg.brightness, b)) * 255.0
    if cfg.contrast:
        factor = _col(_uniform(s[1], 1 - cfg.contrast, 1 + cfg.contrast, b))
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        x = (x - mean) * factor + mean
    if cfg.saturation or cfg.hue:
        # HSV conversions expect 0..1.
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x / 255.0, 0.0, 1.0))
        hue, sat, val = tf.unstack(hsv, axis=-1)
        if cfg.hue:
            delta = _uniform(s[2], -min(cfg.hue, 0.5), min(cfg.hue, 0.5), b)
            hue = tf.math.floormod(hue + delta[:, None, None], 1.0)
        if cfg.saturation:
            lo = max(0.0, 1 - cfg.saturation)
            factor = _uniform(s[3], lo, 1 + cfg.saturation, b)
            sat = tf.clip_by_value(sat * factor[:, None, None], 0.0, 1.0)
        x = tf.image.hsv_to_rgb(tf.stack([hue, sat, val], axis=-1)) * 255.0
    return tf.clip_by_value(x, 0.0, 255.0)


def _box_masks(h, w, cy, cx, bh, bw):
    """Float masks [b, h, w, 1], 1 inside each box of centre (cy, cx), size (bh, bw)."""
    tf = require_tensorflow()
    ys = tf.range(tf.cast(h, tf.float32))[None, :, None]
    xs = tf.range(tf.cast(w, tf.float32))[None, None, :]
    inside_y = tf.abs(ys - cy[:, None, None]) * 2 < bh[:, None, None]
    inside_x = tf.abs(xs - cx[:, None, None]) * 2 < bw[:, None, None]
    return tf.cast(inside_y & inside_x, tf.float32)[..., None]


def _cutout(x, size: float, seed):
    """Zeroes a square of side ``size`` x image side at a random centre per image."""
    tf = require_tensorflow()
    s = tf.random.experimental.stateless_split(seed, 2)
    b = tf.shape(x)[0]
    h = tf.cast(tf.shape(x)[1], tf.float32)
    w = tf.cast(tf.shape(x)[2], tf.float32)
    side = tf.fill([b], size * tf.minimum(h, w))
    cy, cx = _uniform(s[0], 0.0, 1.0, b) * h, _uniform(s[1], 0.0, 1.0, b) * w
    return x * (1 - _box_masks(h, w, cy, cx, side, side))


def _flip(x, axis: int, seed):
    """Flips a random half of the batch along ``axis`` (2: left-right, 1: up-down).

    Partitioning the batch and reversing the flipped part is several times cheaper
    than ``tf.where`` over a broadcast mask or a 4-D ``tf.reverse``, so the pipeline
    keeps up with JPEG decoding (docs/benchmarks.md).
    """
    tf = require_tensorflow()
    b = tf.shape(x)[0]
    flip = tf.cast(_uniform(seed, 0.0, 1.0, b) < 0.5, tf.int32)
    keep, turn = tf.dynamic_partition(x, flip, 2)
    index = tf.dynamic_partition(tf.range(b), flip, 2)
    shape = tf.shape(turn)
    if axis == 2:
        view = tf.reshape(turn, [-1, shape[2], shape[3]])
    else:
        view = tf.reshape(turn, [shape[0], shape[1], -1])
    turned = tf.reshape(tf.reverse(view, [1]), shape)
    return tf.ensure_shape(tf.dynamic_stitch(index, [keep, turned]), x.shape)


def _seed(seed):
    tf = require_tensorflow()
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    return tf.cast(seed, tf.int64)


def augment_batch(images, cfg: AugmentConfig, seed=None, *, dtype=None):
    """Augments a batch ``[b, h, w, 3]`` as ``cfg`` says, each image its own draw.

    Args:
        images: Pixels 0..255 (float or uint8), a tensor or array.
        cfg: Which augmentations, and how strong.
        seed: Shape ``[2]`` integer seed (e.g. one per batch from
            ``tf.data.Dataset.random``); ``None`` draws one.
        dtype: Result dtype; default: the input's. Flips run on the input (cheap
            on uint8), the other ops in float32.

    Returns:
        The augmented batch, same shape; ``dtype`` or the input's dtype.
    """
    tf = require_tensorflow()
    images = tf.convert_to_tensor(images)
    seeds = tf.random.experimental.stateless_split(_seed(seed), 6)
    x = images
    if cfg.flip_lr:
        x = _flip(x, 2, seeds[0])
    if cfg.flip_ud:
        x = _flip(x, 1, seeds[1])
    affine = cfg.rotate or cfg.shear or cfg.zoom or cfg.shift
    colour = cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue
    out = tf.as_dtype(dtype or images.dtype)
    if not needs_float(cfg):
        return tf.cast(x, out)  # flips only: exact
    x = tf.cast(x, tf.float32)
    if cfg.resized_crop:
        # Its own seed stream, so adding it leaves every other op's draws as they were.
        crop_seed = tf.random.experimental.stateless_fold_in(_seed(seed), 7)
        x = random_resized_crop(x, cfg.resized_crop, cfg.crop_aspect, crop_seed)
    if affine:
        x = _affine(x, cfg, seeds[2])
    if cfg.random_crop:
        x = _random_crop(x, cfg.random_crop, seeds[3])
    if colour:
        x = _colour(x, cfg, seeds[4])
    if cfg.cutout:
        x = _cutout(x, cfg.cutout, seeds[5])
    x = tf.ensure_shape(x, images.shape)
    if out.is_integer:
        return tf.cast(tf.clip_by_value(tf.round(x), out.min, out.max), out)
    return tf.cast(x, out)


def flip_image(image, cfg: AugmentConfig, seed):
    """Random flips of ONE image ``[h, w, c]`` (``cfg.flip_lr``, ``cfg.flip_ud``),
    each with probability 1/2, drawn from the ``[2]`` integer ``seed``.

    The training pipeline flips each image right after decoding, while it is uint8
    and still in cache: only the flipped images are copied, once. A flip over the
    batch (:func:`augment_batch`) moves every image of it two or three times.
    """
    tf = require_tensorflow()
    draw = tf.random.stateless_uniform([], _seed(seed), dtype=tf.int64, minval=None)
    return flip_by_bits(image, cfg, draw)


def flip_by_bits(image, cfg: AugmentConfig, bits):
    """Flips ONE image ``[h, w, c]`` as two random bits say: bit 0 left-right
    (``cfg.flip_lr``), bit 1 up-down (``cfg.flip_ud``).

    The training pipeline pairs each record with a value of a seeded
    ``tf.data.Dataset.random`` stream: one C++ draw per element, where a stateless
    draw inside the map costs four more ops per image (docs/benchmarks.md).
    """
    tf = require_tensorflow()
    image = tf.convert_to_tensor(image)
    bits = tf.cast(bits, tf.int64)
    for on, axis, bit in ((cfg.flip_lr, 1, 1), (cfg.flip_ud, 0, 2)):
        if on:
            image = tf.cond(
                tf.bitwise.bitwise_and(bits, bit) != 0,
                lambda x=image, a=axis: tf.reverse(x, [a]),
                lambda x=image: x,
            )
    return image


def augment_image(image, cfg: AugmentConfig, seed=None):
    """Augments one image ``[h, w, 3]`` (see :func:`augment_batch`)."""
    tf = require_tensorflow()
    image = tf.convert_to_tensor(image)
    return augment_batch(image[None], cfg, seed)[0]


def needs_float(cfg: AugmentConfig | None) -> bool:
    """True when ``cfg`` asks for an augmentation other than flips and MixUp/CutMix:
    one that resamples or recolours pixels, in float32."""
    if cfg is None:
        return False
    affine = cfg.rotate or cfg.shear or cfg.zoom or cfg.shift
    colour = cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue
    return bool(affine or colour or cfg.random_crop or cfg.cutout or cfg.resized_crop)


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
    s = tf.random.experimental.stateless_split(_seed(seed), 6)
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
        masks = _box_masks(h, w, cy, cx, cut * h, cut * w)
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
    # tf.cond, not tf.where: a broadcast select over the batch is slow on CPU.
    out_x, out_y = tf.cond(apply, lambda: (mixed, soft), lambda: (x, labels))
    return tf.cast(tf.ensure_shape(out_x, images.shape), images.dtype), out_y
