"""Augmentations, each checked against an independent reference: geometric ops move
marked pixels where the textbook transform says, colour ops match a NumPy/matplotlib
re-implementation of the documented formula, flips and cutout are exact; plus
seeding, per-image draws, tf.data and the JAX backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import photo_crops, run_python

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.augment import augment_image, mix_batch

OFF = AugmentConfig(flip_lr=False)
SINGLE = {
    "flip_lr": OFF.replace(flip_lr=True),
    "flip_ud": OFF.replace(flip_ud=True),
    "rotate": OFF.replace(rotate=30.0),
    "shear": OFF.replace(shear=20.0),
    "zoom": OFF.replace(zoom=0.3),
    "shift": OFF.replace(shift=0.2),
    "brightness": OFF.replace(brightness=0.3),
    "contrast": OFF.replace(contrast=0.5),
    "saturation": OFF.replace(saturation=0.8),
    "hue": OFF.replace(hue=0.2),
    "random_crop": OFF.replace(random_crop=0.4),
    "cutout": OFF.replace(cutout=0.4),
}
ALL = AugmentConfig(
    **{
        f.name: getattr(cfg, f.name)
        for cfg in SINGLE.values()
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(OFF, f.name)
    }
)
SEEDS = [[s, 11] for s in range(5)]


@pytest.fixture(scope="module")
def photo():
    """A real photo crop (scikit-learn's china.jpg), 48 px, float 0..255."""
    return photo_crops(1, 48, seed=3)[0].astype(np.float32)


# ---------------------------------------------------------------------------
# Geometry: three marked squares (one per colour channel) on a dark image. The
# op's parameter is read off one mark; the textbook transform with that parameter
# must then put the other two marks where they are found. A wrong sign or a
# swapped row in the op's matrix moves them elsewhere.

SIDE = 96
CENTRE = np.array([(SIDE - 1) / 2] * 2)


def _marks(corners) -> np.ndarray:
    img = np.zeros((SIDE, SIDE, 3), np.float32)
    for channel, (x, y) in enumerate(corners):
        img[y : y + 4, x : x + 4, channel] = 255
    return img


def _centroids(img) -> list[np.ndarray]:
    """Intensity-weighted (x, y) centre of each channel's mark."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for channel in range(3):
        w = img[..., channel].astype(np.float64)
        assert w.sum() > 0, "a mark left the image"
        out.append(np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum())
    return out


WIDE = [(30, 34), (60, 38), (44, 66)]  # corners of the 4x4 marks
NEAR_CENTRE = [(40, 41), (52, 43), (45, 53)]  # stay inside any random crop


def _rotation(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _angle(v) -> float:
    return float(np.degrees(np.arctan2(v[1], v[0])))


def _expected(name, src, dst):
    """(parameter, expected positions) for the op ``name``, fitted on mark 0."""
    s0, d0 = src[0] - CENTRE, dst[0] - CENTRE
    if name == "rotate":  # about the centre, radius kept
        deg = _angle(d0) - _angle(s0)
        return deg, [CENTRE + _rotation(deg) @ (s - CENTRE) for s in src]
    if name == "zoom":  # scaling about the centre
        z = np.linalg.norm(d0) / np.linalg.norm(s0)
        return z, [CENTRE + z * (s - CENTRE) for s in src]
    if name == "shift":  # a translation
        t = dst[0] - src[0]
        return t / SIDE, [s + t for s in src]
    if name == "shear":  # x moves in proportion to the height above the centre
        k = (d0[0] - s0[0]) / s0[1]
        deg = float(np.degrees(np.arctan(-k)))
        return deg, [s + np.array([k * (s[1] - CENTRE[1]), 0]) for s in src]
    if name == "random_crop":  # a zoom-in of a square box: p = (s - origin) / side
        scale = np.linalg.norm(dst[1] - dst[0]) / np.linalg.norm(src[1] - src[0])
        origin = src[0] - dst[0] / scale
        return 1 / scale, [(s - origin) * scale for s in src]
    raise AssertionError(name)


RANGES = {
    "rotate": (-30, 30),
    "zoom": (0.7, 1.3),
    "shift": (-0.2, 0.2),
    "shear": (-20, 20),
    "random_crop": (0.6, 1.0),  # the crop box's side
}


@pytest.mark.parametrize("name", sorted(RANGES))
def test_geometric_op_moves_marked_pixels_as_its_transform_says(name):
    corners = NEAR_CENTRE if name == "random_crop" else WIDE
    image = _marks(corners)
    src = _centroids(image)
    params = []
    for seed in SEEDS:
        out = augment_image(image, SINGLE[name], seed=seed).numpy()
        dst = _centroids(out)
        param, expected = _expected(name, src, dst)
        for want, got in zip(expected, dst, strict=True):
            np.testing.assert_allclose(got, want, atol=0.25, err_msg=f"seed {seed}")
        lo, hi = RANGES[name]
        assert np.all(lo - 1e-3 <= np.asarray(param)) and np.all(
            np.asarray(param) <= hi + 1e-3
        ), (name, param)
        params.append(np.ravel(param))
    # Each seed draws its own parameter, and the draws are not all trivial.
    assert len({tuple(np.round(p, 3)) for p in params}) == len(SEEDS)
    identity = {"zoom": 1, "random_crop": 1}.get(name, 0)
    assert np.abs(np.concatenate(params) - identity).max() > 0.05


def test_flips_are_exact_and_off_means_identity(photo):
    seen = set()
    for seed in range(12):
        y = augment_image(photo, SINGLE["flip_lr"], seed=[seed, 0]).numpy()
        if np.array_equal(y, photo):
            seen.add("same")
        else:
            np.testing.assert_array_equal(y, photo[:, ::-1])
            seen.add("flipped")
        y = augment_image(photo, SINGLE["flip_ud"], seed=[seed, 0]).numpy()
        assert np.array_equal(y, photo) or np.array_equal(y, photo[::-1])
    assert seen == {"same", "flipped"}
    np.testing.assert_array_equal(augment_image(photo, OFF, seed=[1, 2]).numpy(), photo)


def test_cutout_zeroes_one_square_of_the_configured_side(photo):
    image = np.maximum(photo, 1)  # no black pixel before the cut
    side = 0.4 * 48
    for seed in SEEDS:
        out = augment_image(image, SINGLE["cutout"], seed=seed).numpy()
        cut = np.all(out == 0, axis=-1)
        np.testing.assert_array_equal(out[~cut], image[~cut])
        rows, cols = np.flatnonzero(cut.any(1)), np.flatnonzero(cut.any(0))
        # One filled axis-aligned box...
        assert cut[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert cut.sum() == len(rows) * len(cols)
        # ...whose sides are the configured size, unless the image edge cuts it.
        for idx in (rows, cols):
            inside = idx[0] > 0 and idx[-1] < 47
            assert len(idx) <= np.ceil(side) and (
                not inside or len(idx) >= np.floor(side)
            )


# ---------------------------------------------------------------------------
# Colour: the op's one random factor is read off the output, then the whole
# image must match the documented formula computed in NumPy (or matplotlib's
# HSV conversion), with that factor.


def _hsv(rgb255):
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(np.clip(rgb255 / 255.0, 0, 1))


def _rgb(hsv):
    from matplotlib.colors import hsv_to_rgb

    return hsv_to_rgb(hsv) * 255.0


def _colour_reference(name, x, out):
    """(factor, reference image) for the colour op ``name`` on input ``x``."""
    if name == "brightness":  # x + delta * 255, clipped
        free = (out > 0.5) & (out < 254.5)
        delta = float(np.median(out[free] - x[free])) / 255
        return delta, np.clip(x + delta * 255, 0, 255)
    if name == "contrast":  # (x - channel mean) * f + channel mean, clipped
        mean = x.mean(axis=(0, 1), keepdims=True)
        free = (out > 0.5) & (out < 254.5)
        dx = (x - mean)[free]
        f = float((dx * (out - mean)[free]).sum() / (dx * dx).sum())
        return f, np.clip((x - mean) * f + mean, 0, 255)
    hsv_in, hsv_out = _hsv(x), _hsv(out)
    coloured = (hsv_in[..., 1] > 0.15) & (hsv_in[..., 2] > 0.15)
    if name == "saturation":  # S * f, clipped to 1; H and V kept
        keep = coloured & (hsv_out[..., 1] < 0.99)
        f = float(np.median(hsv_out[..., 1][keep] / hsv_in[..., 1][keep]))
        ref = hsv_in.copy()
        ref[..., 1] = np.clip(ref[..., 1] * f, 0, 1)
        return f, _rgb(ref)
    if name == "hue":  # H + delta (mod 1); S and V kept
        diff = (hsv_out[..., 0] - hsv_in[..., 0])[coloured]
        delta = float(np.angle(np.mean(np.exp(2j * np.pi * diff))) / (2 * np.pi))
        ref = hsv_in.copy()
        ref[..., 0] = np.mod(ref[..., 0] + delta, 1.0)
        return delta, _rgb(ref)
    raise AssertionError(name)


COLOUR_RANGES = {
    "brightness": (-0.3, 0.3),
    "contrast": (0.5, 1.5),
    "saturation": (0.2, 1.8),
    "hue": (-0.2, 0.2),
}


@pytest.mark.parametrize("name", sorted(COLOUR_RANGES))
def test_colour_op_matches_its_formula(photo, name):
    factors = []
    for seed in SEEDS:
        out = augment_image(photo, SINGLE[name], seed=seed).numpy()
        factor, reference = _colour_reference(name, photo.astype(np.float64), out)
        lo, hi = COLOUR_RANGES[name]
        assert lo - 1e-3 <= factor <= hi + 1e-3, (name, factor)
        np.testing.assert_allclose(out, reference, atol=0.6, err_msg=f"seed {seed}")
        factors.append(factor)
    identity = {"contrast": 1, "saturation": 1}.get(name, 0)
    assert len({round(f, 4) for f in factors}) == len(SEEDS)
    assert np.abs(np.array(factors) - identity).max() > 0.05


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_each_op_is_seeded_and_keeps_shape_dtype_and_range(photo, name):
    for dtype in ("float32", "uint8"):
        x = photo.astype(dtype)
        y = augment_image(x, SINGLE[name], seed=[4, 1]).numpy()
        assert y.shape == x.shape and y.dtype == x.dtype
        assert 0 <= y.min() and y.max() <= 255
    a = augment_image(photo, SINGLE[name], seed=[7, 7]).numpy()
    np.testing.assert_array_equal(
        a, augment_image(photo, SINGLE[name], seed=[7, 7]).numpy()
    )


# ---------------------------------------------------------------------------
# Mixing, batches, tf.data and the JAX backend.


def test_mixup_and_cutmix_mix_images_as_their_labels_say(photo):
    import tensorflow as tf

    images = photo_crops(4, 48, seed=5).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)
    # MixUp: each image is lam * itself + (1 - lam) * the partner its label names.
    x, y = mix_batch(images, labels, OFF.replace(mixup=0.5), seed=[3, 4])
    x, y = x.numpy(), y.numpy()
    assert x.shape == images.shape and x.dtype == np.float32
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)
    assert (y.max(1) < 0.999).any()  # some labels are soft
    for i in range(4):
        lam = y[i, i]
        partner = int(np.argmax(np.where(np.arange(4) == i, -1, y[i])))
        other = images[partner] if lam < 1 else images[i]
        np.testing.assert_allclose(x[i], lam * images[i] + (1 - lam) * other, atol=1e-3)
    # CutMix: one box comes from the partner, the rest is the image's own; its
    # label weight is the share of pixels it kept.
    x, y = mix_batch(images, labels, OFF.replace(cutmix=1.0), seed=[5, 6])
    x, y = x.numpy(), y.numpy()
    for i in range(4):
        own = np.all(np.isclose(x[i], images[i]), axis=-1)
        assert abs(own.mean() - y[i, i]) < 0.02
        if y[i, i] < 1:
            partner = int(np.argmax(np.where(np.arange(4) == i, -1, y[i])))
            np.testing.assert_allclose(x[i][~own], images[partner][~own], atol=1e-3)
            rows, cols = np.flatnonzero((~own).any(1)), np.flatnonzero((~own).any(0))
            assert (~own)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean() > 0.9
    # Inside tf.data on batches.
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat(2).batch(4)
    ds = ds.map(lambda a, b: mix_batch(a, b, OFF.replace(mixup=0.2, cutmix=1.0)))
    for a, b in ds:
        assert a.shape == (4, 48, 48, 3) and b.shape == (4, 4)


def test_all_ops_inside_tf_data(photo):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(photo).repeat(8)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=1).batch(2))
    ds = ds.map(lambda x, s: augment_image(x, ALL, seed=s), num_parallel_calls=2)
    assert ds.element_spec.shape.as_list() == [48, 48, 3]
    out = np.stack(list(ds.as_numpy_iterator()))
    assert out.shape == (8, 48, 48, 3) and out.dtype == np.float32
    assert len({o.tobytes() for o in out}) == 8  # each element got its own draw


def test_augment_batch_draws_per_image(photo):
    import tensorflow as tf

    from shopee_tpu.data.read.augment import augment_batch

    batch = np.stack([photo] * 16).astype(np.uint8)
    out = augment_batch(batch, SINGLE["flip_lr"], seed=[0, 1]).numpy()
    assert out.dtype == np.uint8 and out.shape == batch.shape
    flipped = [np.array_equal(o, batch[0][:, ::-1]) for o in out]
    same = [np.array_equal(o, batch[0]) for o in out]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 16
    # The batched op gives each image the draw augment_image gives it alone.
    marks = np.stack([_marks(WIDE)] * 4)
    rotated = augment_batch(marks, SINGLE["rotate"], seed=[0, 1]).numpy()
    angles = {round(_angle(_centroids(r)[0] - CENTRE), 1) for r in rotated}
    assert len(angles) == 4
    ds = tf.data.Dataset.from_tensors(batch).repeat(2)
    ds = ds.map(lambda x: augment_batch(x, ALL, dtype=tf.float32))
    assert ds.element_spec.shape.as_list() == [16, 48, 48, 3]
    for x in ds:
        assert x.dtype == tf.float32
        assert len({img.tobytes() for img in x.numpy()}) == 16


@pytest.mark.slow
def test_pipeline_and_affine_warp_run_in_tf_data_on_the_jax_backend(
    digits_dir, tmp_path
):
    code = (
        f"""
from shopee_tpu.data import load_dataset, write_records_from_csv
write_records_from_csv({digits_dir["train_csv"]!r}, {digits_dir["root"]!r},
                       {str(tmp_path)!r}, shards=2, workers=1, verbose=False)
full = load_dataset({str(tmp_path)!r}, image_size=24, batch_size=8, training=True,
                    augment=AugmentConfig(rotate=15, zoom=0.1, mixup=0.2), seed=0)
for im, y in full.take(1):
    print("pipeline", im.shape, y.shape)
x = photo_crops(1, 16, seed=2)[0].astype("float32")
"""
        + """
import numpy as np, tensorflow as tf, keras
from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.augment import augment_image, mix_batch
assert keras.backend.backend() == "jax"
cfg = AugmentConfig(rotate=20, shear=10, zoom=0.2, shift=0.1, random_crop=0.2,
                    cutout=0.3, hue=0.1, mixup=0.2, cutmix=1.0)
ds = tf.data.Dataset.from_tensors(x).repeat(4)
ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=0).batch(2))
ds = ds.map(lambda im, s: augment_image(im, cfg, seed=s)).batch(4)
ds = ds.map(lambda im: mix_batch(im, tf.one_hot([0, 1, 2, 3], 4), cfg))
for im, y in ds:
    print(im.shape, y.shape, bool(np.abs(im.numpy() - x).max() > 1))
# Keras's own preprocessing layers also switch to TF ops inside tf.data on JAX.
layer = keras.layers.RandomRotation(0.2, seed=1)
rot = tf.data.Dataset.from_tensors(x).repeat(2).batch(2).map(lambda im: layer(im))
for im in rot:
    print(type(im).__module__.split(".")[0], im.shape)
"""
    )
    imports = "import numpy as np, tensorflow as tf, keras\n"
    imports += "from shopee_tpu.config import AugmentConfig\n"
    imports += "from conftest import photo_crops\n"
    out = run_python(imports + code, env={"KERAS_BACKEND": "jax"}, timeout=300)
    lines = out.strip().splitlines()
    assert "pipeline (8, 24, 24, 3) (8, 10)" in lines
    assert lines[-2] == "(4, 16, 16, 3) (4, 4) True"
    assert lines[-1] == "tensorflow (2, 16, 16, 3)"
