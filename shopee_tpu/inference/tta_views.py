"""TTA views and reducers: names -> keras.ops image functions, and the means that
combine the views' probabilities.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shopee_tpu.inference.ensemble import arithmetic_mean, geometric_mean

__all__ = [
    "ViewPlan",
    "reduce_views",
    "view_probs",
    "view_function",
    "host_view_function",
    "classify_views",
    "REDUCERS",
]

REDUCERS = ("mean", "geometric", "beta")
_DIRECTIONS = ("right", "left", "down", "up")

# ---------------------------------------------------------------------------
# Views: functions of an image batch [b, h, w, c] built from keras.ops, so they
# run inside the compiled predict step on any backend; the same functions run on
# numpy arrays (``host_view_function``) for exported models, with no Keras.


def _keras_ops():
    from keras import ops

    return ops


class _NumpyOps:
    """The few ``keras.ops`` the views use, on numpy arrays."""

    flip = staticmethod(np.flip)
    concatenate = staticmethod(np.concatenate)
    transpose = staticmethod(np.transpose)

    @staticmethod
    def rot90(x, k, axes):
        return np.rot90(x, k=k, axes=axes)

    class image:
        @staticmethod
        def resize(x, size, interpolation="bilinear"):
            return _bilinear_resize(x, size)


def _bilinear_resize(x: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of ``[b, h, w, c]`` with half-pixel centres, as
    ``keras.ops.image.resize`` (no antialiasing) computes it."""

    def weights(n_in: int, n_out: int):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    x = np.asarray(x, np.float32)
    top, bottom, wy = weights(x.shape[1], size[0])
    left, right, wx = weights(x.shape[2], size[1])
    rows = x[:, top] * (1 - wy)[None, :, None, None]
    rows = rows + x[:, bottom] * wy[None, :, None, None]
    out = rows[:, :, left] * (1 - wx)[None, None, :, None]
    return out + rows[:, :, right] * wx[None, None, :, None]


def _shift(x, direction: str, k: int, ops):
    """Moves the content ``k`` px towards ``direction``; the uncovered border is
    filled by reflection (like ``keras.layers.RandomTranslation``'s default)."""

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


def _zoom(x, pct: float, ops):
    if not 0 < pct < 100:
        raise ValueError(f"zoom_<pct> needs 0 < pct < 100, got {pct}")
    h, w = x.shape[1], x.shape[2]
    ch, cw = max(1, round(h * pct / 100)), max(1, round(w * pct / 100))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top : top + ch, left : left + cw, :]
    return ops.image.resize(crop, (h, w), interpolation="bilinear")


def _simple_view(name: str, ops=None) -> Callable | None:
    ops = ops or _keras_ops()
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
        return lambda x: _shift(x, direction, k, ops)
    m = re.fullmatch(r"zoom_(\d+(?:\.\d+)?)", name)
    if m:
        pct = float(m.group(1))
        return lambda x: _zoom(x, pct, ops)
    return None


def _members(name: str) -> list[str]:
    """Expands one view name into the single views it averages over."""
    parts = [p.strip() for p in name.split("+")]
    expanded: list[list[str]] = []
    for part in parts:
        m = re.fullmatch(r"shift_(\d+)", part)
        if m:
            expanded.append([f"shift_{d}_{m.group(1)}" for d in _DIRECTIONS])
        # Checked with the numpy views: parsing a plan needs no Keras.
        elif part and _simple_view(part, _NumpyOps) is not None:
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


def view_function(member: str, *, host: bool = False) -> Callable:
    """The keras.ops function of one single view, e.g. ``flip_lr+shift_left_2``;
    ``host=True``: the same view on numpy arrays (no Keras)."""
    ops = _NumpyOps if host else None
    fns = [_simple_view(p, ops) for p in member.split("+")]

    def apply(x):
        for fn in fns:
            x = fn(x)
        return x

    return apply


def host_view_function(member: str) -> Callable:
    """One single view on numpy ``[b, h, w, c]`` arrays, without Keras."""
    return view_function(member, host=True)


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


def classify_views(fns, images, classify):
    """``[b, ...]`` pixels -> ``[b, len(fns), C]``: every view of the batch in one
    call of ``classify``."""
    from keras import ops

    # Pixels arrive as they left the pipeline (uint8: a quarter of the bytes of
    # float32); the views are built from them on the device.
    images = ops.cast(images, "float32")
    b = ops.shape(images)[0]
    stacked = ops.concatenate([fn(images) for fn in fns], axis=0)
    probs = ops.reshape(ops.cast(classify(stacked), "float32"), (len(fns), b, -1))
    return ops.transpose(probs, (1, 0, 2))
