"""The TTA report: does test-time augmentation help on THIS data?

One pass over labelled validation data with all candidate views in the batched call;
from the same outputs it scores each view alone, each reducer over all views, and the
growing view sets (identity, identity + flip_lr, ...) under the mean. Whether TTA
helps depends on the data (in the Cdiscount 3rd place flip helped and more views
hurt; in the Shopee 4th place it was noise), so measure before turning it on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from shopee_tpu.console import known_length, progress_bar
from shopee_tpu.inference.tta import iter_view_probs
from shopee_tpu.inference.tta_views import REDUCERS, ViewPlan, reduce_views
from shopee_tpu.plots import plot_tta_report

__all__ = ["tta_report", "DEFAULT_REPORT_VIEWS"]

DEFAULT_REPORT_VIEWS = (
    "identity",
    "flip_lr",
    "flip_ud",
    "rot180",
    "shift_2",
    "zoom_90",
)


def _labels(extra) -> np.ndarray:
    if extra is None:
        raise ValueError(
            "tta_report needs labelled batches (images, labels): use "
            "load_dataset(..., training=False, labels=True)"
        )
    y = np.asarray(extra)
    if y.ndim == 2:
        return y.argmax(axis=1)
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"tta_report: labels must be one-hot or class ids, got {y.dtype}"
        )
    return y.astype(np.int64)


def tta_report(
    model,
    dataset: Iterable,
    views: Sequence[str] = DEFAULT_REPORT_VIEWS,
    *,
    reducers: Sequence[str] = REDUCERS,
    beta: float = 0.3,
    views_per_call: int | str | None = "auto",
    path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> pd.DataFrame:
    """Accuracy per view, per reducer and per growing view set on validation data.

    Args:
        model: The trained model.
        dataset: Labelled batches ``(images, one-hot or class-id labels)``.
        views: Candidate views (see ``shopee_tpu.inference.tta``); the first one is
            the baseline (``identity`` by default).
        reducers: Reducers scored over all ``views``; ``beta`` needs ``identity``.
        beta: Plain-view weight of the ``beta`` reducer.
        views_per_call: See ``predict``.
        path: Optional PNG path for the bar plot (``plots.plot_tta_report``).
        verbose: Show a progress bar over the batches.

    Returns:
        A DataFrame with columns ``kind`` (``view``, ``reducer`` or ``cumulative``),
        ``name``, ``views``, ``accuracy``, ``delta`` (against the first view alone),
        ``log_loss`` and ``images``.
    """
    plan = ViewPlan.parse(views)
    reducers = [r for r in reducers if r != "beta" or "identity" in plan.names]
    rows: list[tuple[str, str, tuple[str, ...]]] = []
    rows += [("view", name, (name,)) for name in plan.names]
    rows += [("reducer", r, plan.names) for r in reducers]
    rows += [
        ("cumulative", "+".join(plan.names[:k]), plan.names[:k])
        for k in range(2, len(plan.names))  # the full set is the 'mean' reducer row
    ]
    subplans = {}  # the views of each row, as member columns of the full plan
    for _, _, names in rows:
        sub = ViewPlan.parse(names)
        subplans[names] = (sub, [plan.members.index(m) for m in sub.members])
    correct = np.zeros(len(rows))
    loss = np.zeros(len(rows))
    seen = 0
    bar = progress_bar(
        known_length(dataset), "tta report", unit="batch", disable=not verbose
    )
    for extra, member_probs in iter_view_probs(
        model, dataset, plan, views_per_call=views_per_call
    ):
        bar.update()
        y = _labels(extra)
        for r, (kind, name, names) in enumerate(rows):
            sub, members = subplans[names]
            reduce = name if kind == "reducer" else "mean"
            probs = reduce_views(member_probs[:, members], sub, reduce, beta)
            correct[r] += np.sum(probs.argmax(1) == y)
            loss[r] -= np.sum(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))
        seen += len(y)
    bar.close()
    if seen == 0:
        raise ValueError("tta_report: the dataset yielded no images")
    acc = correct / seen
    df = pd.DataFrame(
        {
            "kind": [k for k, _, _ in rows],
            "name": [n for _, n, _ in rows],
            "views": [len(v) for _, _, v in rows],
            "accuracy": acc,
            "delta": acc - acc[0],
            "log_loss": loss / seen,
            "images": seen,
        }
    )
    if path is not None:
        plot_tta_report(df, path)
    return df
