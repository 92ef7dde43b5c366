"""Batched TTA: exact agreement with hand-computed views, reducers, exactly-once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import photo_crops, run_python, xla_flags

SIZE, CLASSES = 8, 5


def _model(seed: int = 0):
    """A model that sees pixel positions (Flatten + Dense), so no view is free."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )


def _images(n: int, seed: int = 0) -> np.ndarray:
    return photo_crops(n, SIZE, seed=seed).astype(np.float32)


def _dataset(images, batch: int, ids=True):
    import tensorflow as tf

    if ids:
        names = np.array([f"img{i:03d}.jpg" for i in range(len(images))])
        return tf.data.Dataset.from_tensor_slices((images, names)).batch(batch)
    return tf.data.Dataset.from_tensor_slices(images).batch(batch)


def _direct(model, images):
    return np.asarray(model.predict_on_batch(images))


def _shift_np(x, direction, k):
    """Reference shift with reflected borders (numpy's 'reflect' excludes the edge)."""
    axis = 2 if direction in ("right", "left") else 1
    pad = [(0, 0)] * 4
    pad[axis] = (k, 0) if direction in ("right", "down") else (0, k)
    p = np.pad(x, pad, mode="reflect")
    index = [slice(None)] * 4
    index[axis] = (
        slice(0, x.shape[axis]) if direction in ("right", "down") else slice(k, None)
    )
    return p[tuple(index)]


def test_flip_mean_equals_hand_computed_mean_with_non_flip_invariant_model():
    from shopee_tpu import predict

    model, x = _model(), _images(10)
    plain, flipped = _direct(model, x), _direct(model, x[:, :, ::-1])
    assert np.abs(plain - flipped).max() > 1e-3  # the model is not flip-invariant
    ids, probs = predict(model, _dataset(x, 4), tta=("identity", "flip_lr"))
    np.testing.assert_allclose(probs, (plain + flipped) / 2, atol=1e-6)
    assert probs.shape == (10, CLASSES) and probs.dtype == np.float32
    assert ids.tolist() == [f"img{i:03d}.jpg" for i in range(10)]


@pytest.mark.parametrize(
    "view, reference",
    [
        ("flip_ud", lambda x: x[:, ::-1]),
        ("rot90", lambda x: np.rot90(x, 1, axes=(1, 2))),
        ("rot180", lambda x: np.rot90(x, 2, axes=(1, 2))),
        ("rot270", lambda x: np.rot90(x, 3, axes=(1, 2))),
        ("transpose", lambda x: x.transpose(0, 2, 1, 3)),
        ("shift_right_2", lambda x: _shift_np(x, "right", 2)),
        ("shift_up_3", lambda x: _shift_np(x, "up", 3)),
        ("flip_lr+rot90", lambda x: np.rot90(x[:, :, ::-1], 1, axes=(1, 2))),
    ],
)
def test_single_views_match_numpy(view, reference):
    from shopee_tpu import predict

    model, x = _model(), _images(5)
    _, probs = predict(model, _dataset(x, 5, ids=False), tta=(view,))
    np.testing.assert_allclose(
        probs, _direct(model, np.ascontiguousarray(reference(x))), atol=1e-6
    )


def test_shift_family_is_mean_of_four_directions():
    from shopee_tpu import predict

    model, x = _model(), _images(6)
    hand = np.mean(
        [_direct(model, _shift_np(x, d, 2)) for d in ("right", "left", "down", "up")],
        axis=0,
    )
    _, probs = predict(model, _dataset(x, 4), tta=("shift_2",))
    np.testing.assert_allclose(probs, hand, atol=1e-6)
    _, both = predict(model, _dataset(x, 4), tta=("identity", "shift_2"))
    np.testing.assert_allclose(both, (_direct(model, x) + hand) / 2, atol=1e-6)


def test_zoom_crops_the_centre():
    from shopee_tpu.inference.tta_views import view_function

    x = np.zeros((1, 20, 20, 3), np.float32)
    x[:, 5:15, 5:15] = 100.0  # the central half is flat
    out = np.asarray(view_function("zoom_50")(x))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, 100.0, atol=1e-4)
    assert np.asarray(view_function("zoom_90")(x))[0, 0, 0, 0] == 0.0


def test_geometric_and_beta_reducers():
    from shopee_tpu import predict

    model, x = _model(), _images(7)
    views = [x, x[:, :, ::-1], x[:, ::-1]]
    p = np.stack([_direct(model, np.ascontiguousarray(v)) for v in views])
    geo = np.exp(np.log(p).mean(0))
    geo /= geo.sum(1, keepdims=True)
    tta = ("identity", "flip_lr", "flip_ud")
    _, probs = predict(model, _dataset(x, 3), tta=tta, reduce="geometric")
    np.testing.assert_allclose(probs, geo, atol=1e-6)
    _, probs = predict(model, _dataset(x, 3), tta=tta, reduce="beta", beta=0.3)
    np.testing.assert_allclose(probs, 0.3 * p[0] + 0.7 * (p[1] + p[2]) / 2, atol=1e-6)


def test_exactly_once_with_partial_last_batch_and_chunked_views():
    from shopee_tpu import predict

    model, x = _model(), _images(11)
    ids, probs = predict(model, _dataset(x, 4), tta=("identity",))
    assert len(ids) == len(set(ids.tolist())) == 11
    assert ids.tolist() == [f"img{i:03d}.jpg" for i in range(11)]
    np.testing.assert_allclose(probs, _direct(model, x), atol=1e-6)
    tta = ("identity", "flip_lr", "rot180")
    _, all_in_one = predict(model, _dataset(x, 4), tta=tta)
    ids2, chunked = predict(model, _dataset(x, 4), tta=tta, views_per_call=1)
    np.testing.assert_allclose(chunked, all_in_one, atol=1e-6)
    assert ids2.tolist() == ids.tolist()


def test_bare_image_batches_and_plain_iterables():
    from shopee_tpu import predict

    model, x = _model(), _images(5)
    ids, probs = predict(model, [x[:3], x[3:]], tta="identity,flip_lr")
    assert ids is None and probs.shape == (5, CLASSES)
    ids, _ = predict(model, [(x[:3], np.array([b"a", b"b", b"c"]))], tta=("identity",))
    assert ids.tolist() == ["a", "b", "c"]


def test_bad_arguments_are_named():
    from shopee_tpu import predict

    model, x = _model(), _images(2)
    with pytest.raises(ValueError, match="unknown TTA view 'flip_diagonal'"):
        predict(model, [x], tta=("identity", "flip_diagonal"))
    with pytest.raises(ValueError, match="add 'identity'"):
        predict(model, [x], tta=("flip_lr", "flip_ud"), reduce="beta")
    with pytest.raises(ValueError, match="reduce must be one of"):
        predict(model, [x], reduce="median")
    with pytest.raises(ValueError, match="lists a view twice"):
        predict(model, [x], tta=("flip_lr", "flip_lr"))


_REPLICA_CODE = """
import json, os, numpy as np
backend = os.environ["KERAS_BACKEND"]
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from shopee_tpu import connect, predict
import tests.test_inference_tta as t
x = t._images(7)
single = t._model()
names = np.array([f"img{i:03d}.jpg" for i in range(7)])
batches = [(x[:4], names[:4]), (x[4:], names[4:])]   # 4 then a ragged 3
_, ref = predict(single, batches, tta=("identity", "flip_lr"))
weights = single.get_weights()
acc = connect(strategy="mirrored" if backend == "tensorflow" else None, verbose=False)
with acc.scope():
    model = t._model()
model.set_weights(weights)
ids, probs = predict(model, batches, tta=("identity", "flip_lr"))
hand = (single.predict_on_batch(x) + single.predict_on_batch(x[:, :, ::-1].copy())) / 2
from shopee_tpu.inference.tta import ViewPlan, _Runner, auto_views_per_call, device_kind
runner = _Runner(model, ViewPlan.parse(["identity"]), None)
# Every grouping of 7 member views over 2 replicas, ragged last batch.
tta = ("identity", "flip_lr", "shift_1", "zoom_90")
grouped = {str(g): predict(model, batches, tta=tta, views_per_call=g) for g in (None, 1, 3, "auto")}
base = grouped["None"][1]
# uint8 pixels, as the pipeline yields them: what crosses to the devices is uint8
# (a quarter of float32's bytes), and the probabilities equal the float input's.
x8 = np.clip(np.round(x), 0, 255).astype(np.uint8)
sent = []
if backend == "jax":
    distribute = keras.distribution.distribute_tensor
    def recorded(t, layout):
        sent.append(str(t.dtype))
        return distribute(t, layout)
    keras.distribution.distribute_tensor = recorded
_, p8 = predict(model, [(x8[:4], names[:4]), (x8[4:], names[4:])], tta=("identity",))
keras.distribution.distribute_tensor = distribute if backend == "jax" else None
_, pf = predict(model, [x8.astype(np.float32)], tta=("identity",))
print(json.dumps({"replicas": acc.replicas, "runner": runner.replicas, "ids": ids.tolist(),
    "err_uint8": float(np.abs(p8 - pf).max()), "sent": sorted(set(sent)),
    "err_ref": float(np.abs(probs - ref).max()), "err_hand": float(np.abs(ref - hand).max()),
    "group_ids": {g: v[0].tolist() for g, v in grouped.items()},
    "group_err": {g: float(np.abs(v[1] - base).max()) for g, v in grouped.items()},
    "kind": device_kind(model), "auto": auto_views_per_call(model)}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.slow
def test_multi_replica_ragged_batches(backend):
    """Two replicas (TF MirroredStrategy over 2 logical CPUs; JAX DataParallel over
    2 host devices): a 3-image batch is padded to 4 and the padding stripped."""
    env = {
        "KERAS_BACKEND": backend,
        "XLA_FLAGS": xla_flags(2),
    }
    out = json.loads(run_python(_REPLICA_CODE, env=env).strip().splitlines()[-1])
    assert out["replicas"] == out["runner"] == 2
    assert out["ids"] == [f"img{i:03d}.jpg" for i in range(7)]
    assert out["err_ref"] < 1e-5 and out["err_hand"] < 1e-5
    # From uint8 pixels (ragged batches) = from the same pixels as float32.
    assert out["err_uint8"] < 1e-5
    assert out["sent"] == (["uint8"] if backend == "jax" else [])
    # Views in one call, one per call, in chunks of 3, or as the device chooses
    # (one per call on CPU): the same probabilities, ids and order.
    assert out["kind"] == "cpu" and out["auto"] == 1
    assert set(out["group_err"]) == {"None", "1", "3", "auto"}
    assert max(out["group_err"].values()) < 1e-5
    assert all(v == out["ids"] for v in out["group_ids"].values())


def test_repeated_calls_reuse_one_compiled_step_outside_the_model():
    """A second predict with the same views reuses the traced step, and the cache
    never becomes part of the model's layers or weights."""
    from shopee_tpu import predict

    model, x = _model(), _images(3)
    layers, weights = len(model.layers), len(model.weights)
    predict(model, [x], tta=("identity", "flip_lr"))  # on CPU: one view per call
    runner = model.shopee_tta_runners[(("identity", "flip_lr"), 1)]
    predict(model, [x], tta=("identity", "flip_lr"))
    predict(model, [x], tta=("identity",))
    assert model.shopee_tta_runners[(("identity", "flip_lr"), 1)] is runner
    assert len(model.shopee_tta_runners) == 2
    assert (len(model.layers), len(model.weights)) == (layers, weights)


def test_tta_step_returns_every_member_view():
    from shopee_tpu.inference.tta import tta_step
    from shopee_tpu.inference.tta_views import ViewPlan

    model, x = _model(), _images(3)
    plan = ViewPlan.parse(("identity", "shift_1"))
    assert plan.members == (
        "identity",
        "shift_right_1",
        "shift_left_1",
        "shift_down_1",
        "shift_up_1",
    )
    out = tta_step(model, ("identity", "shift_1"))(x)
    assert out.shape == (3, 5, CLASSES)
    np.testing.assert_allclose(out[:, 0], _direct(model, x), atol=1e-6)
    np.testing.assert_allclose(
        out[:, 4], _direct(model, _shift_np(x, "up", 1)), atol=1e-6
    )


def test_every_grouping_of_views_gives_the_same_probabilities():
    """All views in one call, one per call, chunks, and the device's choice ("auto",
    one view per call on CPU) agree, with ragged batches and aligned ids; one view
    per call traces a single one-view model whatever the number of views."""
    from shopee_tpu import predict
    from shopee_tpu.inference.tta import ViewPlan, auto_views_per_call, device_kind

    model, x = _model(), _images(11)
    tta = ("identity", "flip_lr", "shift_1", "zoom_90")  # 7 member views
    ref_ids, ref = predict(model, _dataset(x, 4), tta=tta, views_per_call=None)
    # A model that is not flip-invariant: a misordered view would show.
    assert np.abs(ref - _direct(model, x)).max() > 1e-3
    assert device_kind(model) == "cpu" and auto_views_per_call(model) == 1
    for grouping in (1, 2, 3, 6, 7, "auto"):
        ids, probs = predict(model, _dataset(x, 4), tta=tta, views_per_call=grouping)
        np.testing.assert_allclose(probs, ref, atol=1e-5)
        assert ids.tolist() == ref_ids.tolist()
    members = ViewPlan.parse(tta).members
    per_view = model.shopee_tta_runners[(members, 1)]
    assert per_view.per_view and len(per_view.models) == 1
    assert len(model.shopee_tta_runners[(members, 3)].models) == 3
    assert (members, 7) not in model.shopee_tta_runners  # 7 of 7 is all in one call
    with pytest.raises(ValueError, match="views_per_call"):
        predict(model, _dataset(x, 4), tta=tta, views_per_call="fast")
