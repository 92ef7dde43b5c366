"""Combining probabilities: means, products (groups of images), model ensembles,
compact probability files and a stacking meta-learner.

The Cdiscount 3rd place summed the probabilities of all images of a product, averaged
14 models arithmetically (the geometric mean did better for fewer than six models),
and kept 1.77M x 5,270 probability arrays on disk as uint8. Everything here is numpy.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shopee_tpu import fs

__all__ = [
    "arithmetic_mean",
    "geometric_mean",
    "power_mean",
    "aggregate_products",
    "combine_models",
    "ProbFile",
    "save_probs",
    "load_probs",
    "align_probs",
    "first_difference",
    "combine_folds",
]

_EPS = 1e-12
_RESERVED = ("ids", "probs", "scale", "meta")


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers, got {weights!r}")
    return w / w.sum()


def _weighted(p: np.ndarray, axis: int, weights) -> np.ndarray:
    w = _weights(weights, p.shape[axis])
    shape = [1] * p.ndim
    shape[axis] = -1
    return (p * w.reshape(shape)).sum(axis=axis)


def combine_folds(stacked: np.ndarray, reduce: str) -> np.ndarray:
    """Averages fold models' ``[folds, n, classes]`` probabilities: geometrically
    for ``reduce="geometric"``, else arithmetically (``beta`` weights TTA views, not
    models)."""
    mean = geometric_mean if reduce == "geometric" else arithmetic_mean
    return mean(np.asarray(stacked, np.float32), axis=0)


def arithmetic_mean(p, axis: int = 0, weights=None) -> np.ndarray:
    """Weighted arithmetic mean of probability vectors along ``axis``."""
    return _weighted(np.asarray(p, np.float64), axis, weights).astype(np.float32)


def geometric_mean(p, axis: int = 0, weights=None) -> np.ndarray:
    """``exp(mean(log p))`` along ``axis``, renormalised to sum to 1 per row.

    Probabilities are clipped at 1e-12 so a single zero does not veto a class.
    """
    logs = np.log(np.clip(np.asarray(p, np.float64), _EPS, None))
    m = _weighted(logs, axis, weights)
    m -= m.max(axis=-1, keepdims=True)  # stable exp
    e = np.exp(m)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def power_mean(p, axis: int = 0, weights=None, power: float = 0.5) -> np.ndarray:
    """``(mean p**power) ** (1/power)``, renormalised (power 1 = arithmetic)."""
    if power == 0:
        return geometric_mean(p, axis, weights)
    m = _weighted(np.asarray(p, np.float64) ** power, axis, weights) ** (1.0 / power)
    return (m / m.sum(axis=-1, keepdims=True)).astype(np.float32)


def aggregate_products(
    groups: Sequence, probs: np.ndarray, method: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """One prediction per product from the predictions of its images.

    Args:
        groups: Product key of each image (row of ``probs``).
        probs: ``[n_images, classes]``.
        method: ``sum`` (the Cdiscount 3rd place), ``mean`` (same ranking, rows sum
            to 1) or ``geometric`` (product of probabilities, renormalised).

    Returns:
        ``(keys, product_probs)`` with keys in order of first appearance.
    """
    groups = np.asarray(groups)
    probs = np.asarray(probs, np.float64)
    if len(groups) != len(probs):
        raise ValueError(f"{len(groups)} groups for {len(probs)} probability rows")
    keys, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inverse = rank[inverse.ravel()]
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)[:, None]
    if method in ("sum", "mean"):
        out = np.zeros((len(keys), probs.shape[1]))
        np.add.at(out, inverse, probs)
        if method == "mean":
            out /= counts
    elif method == "geometric":
        logs = np.zeros((len(keys), probs.shape[1]))
        np.add.at(logs, inverse, np.log(np.clip(probs, _EPS, None)))
        logs = logs / counts
        logs -= logs.max(axis=1, keepdims=True)
        out = np.exp(logs)
        out /= out.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"method must be sum, mean or geometric, got {method!r}")
    return keys[order], out.astype(np.float32)


@dataclass
class ProbFile:
    """Probabilities of one model with their ids (what ``load_probs`` returns).

    ``rows`` holds other per-row arrays stored beside, such as ``labels`` (class
    ids) and ``folds`` in a k-fold run's ``oof.npz``.
    """

    ids: np.ndarray
    probs: np.ndarray
    meta: dict
    rows: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray | None:
        """The true class ids, when the file holds them (out-of-fold files do)."""
        return self.rows.get("labels")


def save_probs(
    path: str | os.PathLike,
    ids: Sequence,
    probs: np.ndarray,
    *,
    dtype: str = "float16",
    meta: dict | None = None,
    rows: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes ``ids`` and ``probs`` to a compressed ``.npz``, atomically.

    Args:
        dtype: ``float16`` (2 bytes a value), ``uint8`` (1 byte: ``round(p * 255)``,
            the Cdiscount team's format; error <= 0.002) or ``float32``.
        meta: JSON-able notes stored beside (run, views, reducer...).
        rows: Other arrays with one entry per row, e.g. ``labels`` and ``folds``.
    """

    probs = np.asarray(probs, np.float32)
    ids = np.asarray(ids)
    if probs.ndim != 2 or len(ids) != len(probs):
        raise ValueError(
            f"need ids [n] and probs [n, classes], got {ids.shape}, {probs.shape}"
        )
    if dtype == "uint8":
        stored, scale = np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8), 255.0
    elif dtype in ("float16", "float32"):
        stored, scale = probs.astype(dtype), 1.0
    else:
        raise ValueError(f"dtype must be float16, uint8 or float32, got {dtype!r}")
    extra = {k: np.asarray(v) for k, v in (rows or {}).items()}
    for key, value in extra.items():
        if key in _RESERVED or len(value) != len(ids):
            raise ValueError(f"rows[{key!r}]: need a new name and {len(ids)} entries")
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        ids=ids.astype(str),
        probs=stored,
        scale=np.float32(scale),
        meta=np.array(json.dumps(meta or {})),
        **extra,
    )
    fs.write_bytes(path, buf.getvalue())


def load_probs(path: str | os.PathLike) -> ProbFile:
    """Reads a file written by ``save_probs``; probabilities come back float32."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"ids", "probs", "scale"} - set(z.files)
        if missing:
            raise ValueError(
                f"{path}: not a probability file (missing {sorted(missing)})"
            )
        probs = z["probs"].astype(np.float32) / float(z["scale"])
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        rows = {k: z[k] for k in z.files if k not in _RESERVED}
        return ProbFile(z["ids"], probs, meta, rows)


def align_probs(files: Sequence[ProbFile], *, names: Sequence[str] | None = None):
    """Reorders every file's rows to the ids of the first; the id sets must match.

    Returns:
        ``(ids, stacked probs [models, n, classes])``.
    """
    names = list(names or [f"model {i}" for i in range(len(files))])
    ids = np.asarray(files[0].ids)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"{names[0]}: duplicate ids")
    out = []
    for f, name in zip(files, names, strict=True):
        if f.probs.shape[1] != files[0].probs.shape[1]:
            raise ValueError(
                f"{name}: {f.probs.shape[1]} classes, {names[0]} has {files[0].probs.shape[1]}"
            )
        index = {k: i for i, k in enumerate(np.asarray(f.ids).tolist())}
        missing = [k for k in ids.tolist() if k not in index]
        extra = sorted(set(index) - set(ids.tolist()))
        if missing or extra or len(index) != len(f.ids):
            first = first_difference(ids, f.ids, (names[0], name))
            raise ValueError(
                f"{name}: ids differ from {names[0]}: first differing id {first}; "
                f"missing {missing[:5]}, "
                f"extra {extra[:5]}, duplicates {len(f.ids) - len(index)}"
            )
        out.append(f.probs[[index[k] for k in ids.tolist()]])
    return ids, np.stack(out)


def first_difference(
    a: Sequence, b: Sequence, names: tuple[str, str] = ("the first", "the second")
) -> str:
    """Names the first id (in sorted order) that is in one id list but not the
    other, or that one list repeats, e.g. ``'x.jpg' (in a.npz, not in b.npz)``.
    """
    ua, ca = np.unique(np.asarray(a).astype(str), return_counts=True)
    ub, cb = np.unique(np.asarray(b).astype(str), return_counts=True)
    count_a, count_b = dict(zip(ua.tolist(), ca)), dict(zip(ub.tolist(), cb))
    for key in sorted(set(count_a) | set(count_b)):
        na, nb = int(count_a.get(key, 0)), int(count_b.get(key, 0))
        if na != nb:
            if not na or not nb:
                where, other = names if na else names[::-1]
                return f"{key!r} (in {where}, not in {other})"
            return f"{key!r} ({na} times in {names[0]}, {nb} in {names[1]})"
    return "none"


def combine_models(
    members: Sequence,
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    power: float = 0.5,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Combines several models' probabilities.

    Args:
        members: Probability files (paths or ``ProbFile``; rows matched by id) or
            plain arrays ``[n, classes]`` already in the same row order.
        method: ``mean`` (weighted arithmetic), ``geometric`` or ``power``.
        weights: One non-negative weight per member (normalised); default equal.
        power: Exponent for ``method="power"`` (0.5 in Convoluted Predictions'
            blend).

    Returns:
        ``(ids or None, probs [n, classes])``.
    """
    if not members:
        raise ValueError("combine_models needs at least one member")
    if all(isinstance(m, str | os.PathLike | ProbFile) for m in members):
        files = [m if isinstance(m, ProbFile) else load_probs(m) for m in members]
        names = [str(m) if not isinstance(m, ProbFile) else None for m in members]
        ids, stacked = align_probs(
            files, names=[n or f"model {i}" for i, n in enumerate(names)]
        )
    else:
        ids = None
        stacked = np.stack([np.asarray(m, np.float32) for m in members])
    if method == "mean":
        return ids, arithmetic_mean(stacked, 0, weights)
    if method == "geometric":
        return ids, geometric_mean(stacked, 0, weights)
    if method == "power":
        return ids, power_mean(stacked, 0, weights, power)
    raise ValueError(f"method must be mean, geometric or power, got {method!r}")
