"""Augmentations: shape and dtype kept, eagerly and inside tf.data, on TF and JAX."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import run_python

from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.augment import augment_image, mix_batch

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


@pytest.fixture(scope="module")
def photo():
    """A real photo crop (scikit-learn's china.jpg), 48 px, float 0..255."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image("china.jpg")[100:340, 200:440])
    return np.asarray(img.resize((48, 48)), np.float32)


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_each_op_keeps_shape_dtype_and_changes_the_image(photo, name):
    cfg = SINGLE[name]
    changed = 0
    for seed in range(6):
        for dtype in ("float32", "uint8"):
            x = photo.astype(dtype)
            y = augment_image(x, cfg, seed=[seed, 1]).numpy()
            assert y.shape == x.shape and y.dtype == x.dtype
            assert 0 <= y.min() and y.max() <= 255
        changed += not np.allclose(y, x, atol=1)
    assert changed >= 2, f"{name} never changed the image"
    # Seeded: the same seed gives the same result.
    a = augment_image(photo, cfg, seed=[7, 7]).numpy()
    np.testing.assert_array_equal(a, augment_image(photo, cfg, seed=[7, 7]).numpy())


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


def test_all_ops_inside_tf_data(photo):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(photo).repeat(8)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=1).batch(2))
    ds = ds.map(lambda x, s: augment_image(x, ALL, seed=s), num_parallel_calls=2)
    assert ds.element_spec.shape.as_list() == [48, 48, 3]
    out = np.stack(list(ds.as_numpy_iterator()))
    assert out.shape == (8, 48, 48, 3) and out.dtype == np.float32
    assert len({o.tobytes() for o in out}) == 8  # each element got its own draw


def test_mixup_and_cutmix_soft_labels(photo):
    import tensorflow as tf

    images = np.stack([photo, photo[::-1], photo[:, ::-1], 255 - photo])
    labels = np.eye(4, dtype=np.float32)
    for cfg in (OFF.replace(mixup=0.5), OFF.replace(cutmix=1.0)):
        x, y = mix_batch(images, labels, cfg, seed=[3, 4])
        x, y = x.numpy(), y.numpy()
        assert x.shape == images.shape and x.dtype == np.float32
        np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)
        assert (y.max(1) < 1).any()  # some labels are soft
        assert not np.allclose(x, images)
    # CutMix labels follow the pasted area: a pixel-count check on one example.
    x, y = mix_batch(images, labels, OFF.replace(cutmix=1.0), seed=[5, 6])
    changed = (np.abs(x.numpy() - images).sum(-1) > 0).mean(axis=(1, 2))
    own = y.numpy()[np.arange(4), np.arange(4)]
    assert np.all(own <= 1 - changed + 1e-6)
    # Inside tf.data on batches.
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat(2).batch(4)
    ds = ds.map(lambda a, b: mix_batch(a, b, OFF.replace(mixup=0.2, cutmix=1.0)))
    for a, b in ds:
        assert a.shape == (4, 48, 48, 3) and b.shape == (4, 4)


def test_pipeline_and_affine_ops_run_in_tf_data_on_the_jax_backend(
    digits_dir, tmp_path
):
    code = (
        f"""
from shopee_tpu.data import load_dataset, write_records_from_csv
write_records_from_csv({digits_dir["train_csv"]!r}, {digits_dir["root"]!r},
                       {str(tmp_path)!r}, shards=2, workers=1)
full = load_dataset({str(tmp_path)!r}, image_size=24, batch_size=8, training=True,
                    augment=AugmentConfig(rotate=15, zoom=0.1, mixup=0.2), seed=0)
for im, y in full.take(1):
    print("pipeline", im.shape, y.shape)
"""
        + """
import numpy as np, tensorflow as tf, keras
from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.augment import augment_image, mix_batch
assert keras.backend.backend() == "jax"
cfg = AugmentConfig(rotate=20, shear=10, zoom=0.2, shift=0.1, random_crop=0.2,
                    cutout=0.3, hue=0.1, mixup=0.2, cutmix=1.0)
x = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype("float32")
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
    out = run_python(imports + code, env={"KERAS_BACKEND": "jax"}, timeout=300)
    lines = out.strip().splitlines()
    assert "pipeline (8, 24, 24, 3) (8, 10)" in lines
    assert lines[-2] == "(4, 16, 16, 3) (4, 4) True"
    assert lines[-1] == "tensorflow (2, 16, 16, 3)"


def test_augment_batch_draws_per_image(photo):
    import tensorflow as tf

    from shopee_tpu.data.augment import augment_batch

    batch = np.stack([photo] * 16).astype(np.uint8)
    out = augment_batch(batch, SINGLE["flip_lr"], seed=[0, 1]).numpy()
    assert out.dtype == np.uint8 and out.shape == batch.shape
    flipped = [np.array_equal(o, batch[0][:, ::-1]) for o in out]
    same = [np.array_equal(o, batch[0]) for o in out]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 16
    ds = tf.data.Dataset.from_tensors(batch).repeat(2)
    ds = ds.map(lambda x: augment_batch(x, ALL, dtype=tf.float32))
    assert ds.element_spec.shape.as_list() == [16, 48, 48, 3]
    for x in ds:
        assert x.dtype == tf.float32
        assert len({img.tobytes() for img in x.numpy()}) == 16
