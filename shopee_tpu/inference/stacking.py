"""Stacking: a multinomial logistic regression over several models' probabilities.

Fit it on out-of-fold (OOF) probabilities of k-fold runs, where every training image
was predicted by a model that did not see it, then apply it to the same models' test
probabilities. The features are log-probabilities, so the starting point (equal
weights, zero bias) is exactly the geometric mean of the models; training can only
lower the OOF loss from there.

Two shapes of the meta-learner:

- ``per_class`` (default): ``logit[c] = sum_m W[m, c] * log p_m[c] + b[c]``, i.e. a
  learned weight per model and class plus a class bias. ``M*C + C`` parameters, so it
  scales to Cdiscount's 5,270 classes.
- ``full``: ``logit = concat_m(log p_m) @ W + b``, a full ``(M*C) x C`` matrix, for a
  handful of classes only.

Pure numpy, full-batch Adam on the mean cross-entropy with L2 on the weights.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shopee_tpu import fs
from shopee_tpu.inference.ensemble import ProbFile, load_probs

__all__ = ["LogisticStacker", "fit_stacker", "concat_folds"]

_EPS = 1e-7


def _features(probs) -> np.ndarray:
    """``[models, n, classes]`` log-probabilities as float64."""
    x = np.stack([np.asarray(p, np.float64) for p in probs])
    if x.ndim != 3:
        raise ValueError(f"expected a list of [n, classes] arrays, got shape {x.shape}")
    return np.log(np.clip(x, _EPS, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class LogisticStacker:
    """A fitted meta-learner (see the module docstring)."""

    kind: str
    weights: np.ndarray
    bias: np.ndarray
    loss_history: tuple[float, ...] = ()

    def logits(self, probs) -> np.ndarray:
        x = _features(probs)
        m, n, c = x.shape
        if self.kind == "per_class":
            if self.weights.shape != (m, c):
                raise ValueError(
                    f"stacker fitted on {self.weights.shape[0]} models x "
                    f"{self.weights.shape[1]} classes, got {m} x {c}"
                )
            return np.einsum("mnc,mc->nc", x, self.weights) + self.bias
        flat = x.transpose(1, 0, 2).reshape(n, m * c)
        if flat.shape[1] != self.weights.shape[0]:
            raise ValueError(
                f"stacker fitted on {self.weights.shape[0]} features, got {flat.shape[1]}"
            )
        return flat @ self.weights + self.bias

    def predict(self, probs) -> np.ndarray:
        """Probabilities ``[n, classes]`` from the models' ``[n, classes]`` arrays
        (in the order used for fitting)."""
        return _softmax(self.logits(probs)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted parameters to an ``.npz``, atomically."""

        buf = io.BytesIO()
        np.savez(buf, kind=np.array(self.kind), weights=self.weights, bias=self.bias)
        fs.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogisticStacker:
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["kind"]), z["weights"], z["bias"])


def fit_stacker(
    probs: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    kind: str = "per_class",
    l2: float = 1e-4,
    steps: int = 300,
    learning_rate: float = 0.05,
) -> LogisticStacker:
    """Fits the meta-learner on out-of-fold probabilities.

    Args:
        probs: One ``[n, classes]`` array per model, rows aligned (same images).
        labels: The true class id of each row.
        kind: ``per_class`` or ``full``.
        l2: L2 penalty on the weights' distance from the equal-weight start.
        steps: Full-batch Adam steps.
        learning_rate: Adam step size.
    """
    x = _features(probs)
    m, n, c = x.shape
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (n,) or y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must be {n} class ids in [0, {c}), got {y[:5]}...")
    onehot = np.eye(c)[y]
    if kind == "per_class":
        w0 = np.full((m, c), 1.0 / m)
    elif kind == "full":
        w0 = np.tile(np.eye(c), (m, 1)) / m
        flat = x.transpose(1, 0, 2).reshape(n, m * c)
    else:
        raise ValueError(f"kind must be per_class or full, got {kind!r}")
    params = [w0.copy(), np.zeros(c)]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    b1, b2 = 0.9, 0.999
    history = []
    for t in range(1, steps + 1):
        w, b = params
        logits = (
            np.einsum("mnc,mc->nc", x, w) if kind == "per_class" else flat @ w
        ) + b
        p = _softmax(logits)
        loss = -np.mean(np.log(p[np.arange(n), y] + 1e-15))
        history.append(float(loss + l2 * np.sum((w - w0) ** 2)))
        g = (p - onehot) / n
        gw = np.einsum("mnc,nc->mc", x, g) if kind == "per_class" else flat.T @ g
        grads = [gw + 2 * l2 * (w - w0), g.sum(axis=0)]
        for param, grad, mom in zip(params, grads, moments, strict=True):
            mom[0] = b1 * mom[0] + (1 - b1) * grad
            mom[1] = b2 * mom[1] + (1 - b2) * grad**2
            mhat, vhat = mom[0] / (1 - b1**t), mom[1] / (1 - b2**t)
            param -= learning_rate * mhat / (np.sqrt(vhat) + 1e-8)
    return LogisticStacker(kind, params[0], params[1], tuple(history))


def concat_folds(files: Sequence[str | os.PathLike | ProbFile]) -> ProbFile:
    """Joins the out-of-fold probability files of one model's k folds.

    Each fold predicted a disjoint part of the training images; an id predicted by
    two folds is an error (it would mean a leak between folds).
    """
    parts = [f if isinstance(f, ProbFile) else load_probs(f) for f in files]
    if not parts:
        raise ValueError("concat_folds needs at least one file")
    ids = np.concatenate([p.ids for p in parts])
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(
            f"ids predicted by more than one fold: {uniq[counts > 1][:5].tolist()}"
        )
    probs = np.concatenate([p.probs for p in parts])
    meta = {"folds": [json.dumps(p.meta) for p in parts]}
    return ProbFile(ids, probs, meta)
