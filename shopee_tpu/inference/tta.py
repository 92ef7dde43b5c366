"""``shopee_tpu.predict``: batched test-time augmentation (TTA).

Every view of a batch goes through the model in ONE compiled call: the views are
built on the device with ``keras.ops``, concatenated along the batch axis, classified
together, and the result comes back as ``[batch, views, classes]``. So K views cost
about K times the arithmetic of one view and no extra calls, host copies or
retracing (``shopee-tpu bench predict`` measures this).

View names (compose with ``+``, e.g. ``flip_lr+zoom_90``):

==================  ===========================================================
``identity``        the image as read
``flip_lr``         mirrored left-right (the Cdiscount 3rd place's second view)
``flip_ud``         mirrored top-bottom
``rot90/180/270``   rotated counter-clockwise (square inputs for 90 and 270)
``transpose``       rows and columns swapped
``shift_<k>``       a family of four views, moved ±k px right/left/down/up with
                    reflected borders; it counts as ONE view whose probabilities
                    are the mean of its four members (``shift_2`` in the demo)
``shift_right_<k>`` one direction only; also ``shift_left_``, ``shift_down_``,
                    ``shift_up_``
``zoom_<pct>``      centre crop keeping ``pct`` % of each side, resized back
                    (bilinear), e.g. ``zoom_90``
==================  ===========================================================

Reducers combine the views of each image: ``mean`` (arithmetic), ``geometric``
(exp of the mean log-probability, renormalised) and ``beta`` (``beta * identity +
(1 - beta) * mean of the other views``, the Shopee 7th place's blend). A family such
as ``shift_2`` is first combined with the same kind of mean (arithmetic for ``mean``
and ``beta``, geometric for ``geometric``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from shopee_tpu.inference.ensemble import arithmetic_mean, geometric_mean

__all__ = ["predict", "iter_view_probs", "reduce_views", "ViewPlan", "REDUCERS"]

REDUCERS = ("mean", "geometric", "beta")
_DIRECTIONS = ("right", "left", "down", "up")


# ---------------------------------------------------------------------------
# Views: functions of an image batch [b, h, w, c] built from keras.ops only, so
# they run inside the compiled predict step on any backend.


def _shift(x, direction: str, k: int):
    """Moves the content ``k`` px towards ``direction``; the uncovered border is
    filled by reflection (like ``keras.layers.RandomTranslation``'s default)."""
    from keras import ops

    axis = 2 if direction in ("right", "left") else 1
    side = x.shape[axis]
    if side is not None and not 0 < k < side:
        raise ValueError(f"shift of {k} px needs 0 < k < image side {side}")

    def take(start, stop):
        index = [slice(None)] * 4
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    if direction in ("right", "down"):
        border = ops.flip(take(1, k + 1), axis=axis)
        return ops.concatenate([border, take(0, -k)], axis=axis)
    border = ops.flip(take(-k - 1, -1), axis=axis)
    return ops.concatenate([take(k, None), border], axis=axis)


def _zoom(x, pct: float):
    from keras import ops

    if not 0 < pct < 100:
        raise ValueError(f"zoom_<pct> needs 0 < pct < 100, got {pct}")
    h, w = x.shape[1], x.shape[2]
    ch, cw = max(1, round(h * pct / 100)), max(1, round(w * pct / 100))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top : top + ch, left : left + cw, :]
    return ops.image.resize(crop, (h, w), interpolation="bilinear")


def _simple_view(name: str) -> Callable | None:
    from keras import ops

    fixed = {
        "identity": lambda x: x,
        "flip_lr": lambda x: ops.flip(x, axis=2),
        "flip_ud": lambda x: ops.flip(x, axis=1),
        "rot90": lambda x: ops.rot90(x, k=1, axes=(1, 2)),
        "rot180": lambda x: ops.rot90(x, k=2, axes=(1, 2)),
        "rot270": lambda x: ops.rot90(x, k=3, axes=(1, 2)),
        "transpose": lambda x: ops.transpose(x, (0, 2, 1, 3)),
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"shift_(right|left|down|up)_(\d+)", name)
    if m:
        direction, k = m.group(1), int(m.group(2))
        return lambda x: _shift(x, direction, k)
    m = re.fullmatch(r"zoom_(\d+(?:\.\d+)?)", name)
    if m:
        pct = float(m.group(1))
        return lambda x: _zoom(x, pct)
    return None


def _members(name: str) -> list[str]:
    """Expands one view name into the single views it averages over."""
    parts = [p.strip() for p in name.split("+")]
    expanded: list[list[str]] = []
    for part in parts:
        m = re.fullmatch(r"shift_(\d+)", part)
        if m:
            expanded.append([f"shift_{d}_{m.group(1)}" for d in _DIRECTIONS])
        elif part and _simple_view(part) is not None:
            expanded.append([part])
        else:
            raise ValueError(
                f"unknown TTA view {part!r} in {name!r}; use identity, flip_lr, "
                "flip_ud, rot90, rot180, rot270, transpose, shift_<k>, "
                "shift_{right,left,down,up}_<k>, zoom_<pct>, or a+b to compose"
            )
    combos = [[]]
    for options in expanded:
        combos = [c + [o] for c in combos for o in options]
    return ["+".join(c) for c in combos]


def _view_fn(member: str) -> Callable:
    fns = [_simple_view(p) for p in member.split("+")]

    def apply(x):
        for fn in fns:
            x = fn(x)
        return x

    return apply


@dataclass(frozen=True)
class ViewPlan:
    """The named views and the single views ("members") the model actually sees.

    Attributes:
        names: The views as asked for, e.g. ``("identity", "shift_2")``.
        members: Every single view, in model-call order.
        groups: For each name, the indices of its members in ``members``.
    """

    names: tuple[str, ...]
    members: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def parse(cls, views: str | Sequence[str]) -> ViewPlan:
        """Checks and expands view names (a comma-separated string or a list)."""
        if isinstance(views, str):
            views = [v for v in views.split(",") if v.strip()]
        names = tuple(v.strip() for v in views)
        if not names:
            raise ValueError("tta needs at least one view, e.g. ('identity',)")
        if len(set(names)) != len(names):
            raise ValueError(f"tta lists a view twice: {list(names)}")
        members: list[str] = []
        groups = []
        for name in names:
            idx = []
            for member in _members(name):
                if member not in members:
                    members.append(member)
                idx.append(members.index(member))
            groups.append(tuple(idx))
        return cls(names, tuple(members), tuple(groups))


def reduce_views(
    member_probs: np.ndarray, plan: ViewPlan, reduce: str = "mean", beta: float = 0.3
) -> np.ndarray:
    """Combines ``[n, members, classes]`` probabilities into ``[n, classes]``.

    Args:
        member_probs: Model outputs for every member view of ``plan``.
        plan: The views (see ``ViewPlan.parse``).
        reduce: ``mean``, ``geometric`` or ``beta``.
        beta: Weight of the ``identity`` view for ``reduce="beta"``.
    """
    per_view = view_probs(member_probs, plan, reduce)
    if reduce == "mean":
        return arithmetic_mean(per_view, axis=1)
    if reduce == "geometric":
        return geometric_mean(per_view, axis=1)
    if "identity" not in plan.names:
        raise ValueError("reduce='beta' weights the plain view: add 'identity' to tta")
    plain = plan.names.index("identity")
    others = [i for i in range(len(plan.names)) if i != plain]
    if not others:
        return per_view[:, plain]
    rest = arithmetic_mean(per_view[:, others], axis=1)
    return (beta * per_view[:, plain] + (1.0 - beta) * rest).astype(np.float32)


def view_probs(member_probs: np.ndarray, plan: ViewPlan, reduce: str = "mean"):
    """``[n, members, classes]`` -> ``[n, names, classes]`` (families combined)."""
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    combine = geometric_mean if reduce == "geometric" else arithmetic_mean
    out = [
        member_probs[:, g[0]] if len(g) == 1 else combine(member_probs[:, g], axis=1)
        for g in plan.groups
    ]
    return np.stack(out, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# The batched, compiled model call.


def _tta_model(model, members: Sequence[str]):
    """A keras Model mapping images [b, ...] to probabilities [b, len(members), C]."""
    import keras
    from keras import ops

    fns = [_view_fn(m) for m in members]

    class TTAModel(keras.Model):
        def __init__(self, base):
            # float32 so a mixed-precision policy never rounds the pixels before
            # the views are built; the base model casts as it always does.
            super().__init__(dtype="float32", name="tta")
            self.base = base

        def call(self, images, training=False):
            b = ops.shape(images)[0]
            stacked = ops.concatenate([fn(images) for fn in fns], axis=0)
            probs = ops.cast(self.base(stacked, training=False), "float32")
            probs = ops.reshape(probs, (len(fns), b, -1))
            return ops.transpose(probs, (1, 0, 2))

    return TTAModel(model)


class _Runner:
    """Calls the TTA models on one numpy batch, with multi-replica distribution."""

    def __init__(self, model, plan: ViewPlan, views_per_call: int | None):
        import keras

        k = len(plan.members) if not views_per_call else max(1, int(views_per_call))
        chunks = [plan.members[i : i + k] for i in range(0, len(plan.members), k)]
        self.backend = keras.backend.backend()
        self.strategy = None
        self.distribution = None
        self.replicas = 1
        if self.backend == "tensorflow":
            strategy = getattr(model, "distribute_strategy", None)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                self.strategy, self.replicas = strategy, strategy.num_replicas_in_sync
        elif self.backend == "jax":
            dist = keras.distribution.distribution()
            if dist is not None:
                mesh = dist.device_mesh
                axis = mesh.axis_names.index(dist.batch_dim_name)
                self.distribution, self.replicas = dist, int(mesh.shape[axis])
        if self.strategy is not None:
            with self.strategy.scope():
                self.models = [_tta_model(model, c) for c in chunks]
            self.steps = [self._tf_distributed_step(m) for m in self.models]
        else:
            self.models = [_tta_model(model, c) for c in chunks]
            self.steps = [self._plain_step(m) for m in self.models]

    def _plain_step(self, tta_model):
        import keras

        def step(x):
            if self.distribution is not None:
                layout = self.distribution.get_data_layout(x.shape)
                x = keras.distribution.distribute_tensor(x, layout)
            return np.asarray(tta_model.predict_on_batch(x))

        return step

    def _tf_distributed_step(self, tta_model):
        from shopee_tpu.utils import require_tensorflow

        tf = require_tensorflow()
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def run(dist_x):
            return strategy.run(lambda x: tta_model(x, training=False), args=(dist_x,))

        def step(x):
            parts = np.split(x, self.replicas)
            dist_x = strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
            )
            out = strategy.experimental_local_results(run(dist_x))
            return np.concatenate([np.asarray(t) for t in out], axis=0)

        return step

    def __call__(self, images: np.ndarray, pad_to: int) -> np.ndarray:
        """Returns ``[b, members, classes]`` for ``images``; pads to ``pad_to`` rows
        (a multiple of the replicas) so shapes stay fixed, and strips the padding."""
        b = len(images)
        if pad_to > b:
            pad = np.zeros((pad_to - b,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad], axis=0)
        outs = [step(images) for step in self.steps]
        out = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        return out[:b]


def _cached_runner(model, plan: ViewPlan, views_per_call: int | None) -> _Runner:
    """One runner (and so one traced function) per model, views and chunking:
    calling ``predict`` again does not retrace. The cache hangs off the model with
    ``object.__setattr__``, out of Keras' layer tracking (it never becomes part of
    the model's layers or weights), and dies with the model."""
    cache = model.__dict__.get("_shopee_tta_runners")
    if cache is None:
        cache = {}
        object.__setattr__(model, "_shopee_tta_runners", cache)
    key = (plan.members, views_per_call)
    if key not in cache:
        cache[key] = _Runner(model, plan, views_per_call)
    return cache[key]


def _to_numpy(t) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def _split_batch(batch):
    if isinstance(batch, tuple | list):
        if len(batch) == 1:
            return batch[0], None
        return batch[0], batch[1]
    if isinstance(batch, dict):
        raise ValueError(
            "predict expects (images, ids) or bare image batches, got a dict with "
            f"keys {sorted(batch)}"
        )
    return batch, None


def _decode_ids(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind in ("O", "S"):
        return np.array(
            [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids],
            dtype=str,
        )
    return ids


def iter_view_probs(
    model,
    dataset: Iterable,
    plan: ViewPlan,
    *,
    views_per_call: int | None = None,
) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """Yields ``(second element or None, [b, members, classes])`` per batch.

    The second element of ``(images, ids)`` batches is passed through as numpy (ids
    decoded to ``str``), so validation batches ``(images, labels)`` work as well.
    """
    runner = _cached_runner(model, plan, views_per_call)
    largest = 0
    for batch in dataset:
        images, extra = _split_batch(batch)
        images = np.asarray(_to_numpy(images), dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(
                f"predict expects image batches [b, h, w, c], got shape {images.shape}"
            )
        b = len(images)
        if b == 0:
            continue
        # Pad a short last batch up to the full batch size: compiled functions (XLA
        # on TPU especially) then see one shape and do not recompile for it.
        r = runner.replicas
        largest = max(largest, -(-b // r) * r)
        probs = runner(images, largest)
        if extra is not None:
            extra = _decode_ids(_to_numpy(extra))
            if len(extra) != b:
                raise ValueError(f"batch has {b} images but {len(extra)} ids")
        yield extra, probs


def predict(
    model,
    dataset: Iterable,
    tta: str | Sequence[str] = ("identity", "flip_lr"),
    reduce: str = "mean",
    beta: float = 0.3,
    *,
    views_per_call: int | None = None,
    verbose: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Predicts every image of ``dataset`` with test-time augmentation.

    Args:
        model: A Keras model mapping images to class probabilities.
        dataset: ``load_dataset(..., training=False)`` (``(images, ids)`` batches)
            or any iterable of image batches or ``(images, ids)`` pairs.
        tta: View names (see the module docstring), a list or "a,b,c".
        reduce: ``mean``, ``geometric`` or ``beta``.
        beta: Weight of ``identity`` when ``reduce="beta"``.
        views_per_call: At most this many single views per model call, to bound
            memory (the batch the model sees is ``batch * views``); ``None`` sends
            all views in one call.
        verbose: Show a progress bar.

    Returns:
        ``(ids, probs)``: ids as ``str`` (``None`` for bare image batches) and
        float32 ``probs [n, classes]`` in dataset order, each image exactly once.
    """
    plan = ViewPlan.parse(tta)
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    if reduce == "beta" and "identity" not in plan.names:
        raise ValueError("reduce='beta' weights the plain view: add 'identity' to tta")
    batches = iter_view_probs(model, dataset, plan, views_per_call=views_per_call)
    if verbose:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="predict", unit="batch")
    ids, probs = [], []
    for extra, member_probs in batches:
        probs.append(reduce_views(member_probs, plan, reduce, beta))
        ids.append(extra)
    if not probs:
        raise ValueError("predict: the dataset yielded no images")
    have_ids = [i is not None for i in ids]
    if any(have_ids) and not all(have_ids):
        raise ValueError("predict: some batches carry ids and others do not")
    out_ids = np.concatenate(ids) if all(have_ids) else None
    return out_ids, np.concatenate(probs).astype(np.float32)
