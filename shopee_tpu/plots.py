"""Plots for notebooks and run folders: sample grids, training curves, the LR schedule,
confusion matrices, sample predictions and the TTA report.

Every function returns the matplotlib Figure and, given ``path``, also saves it as a
PNG and closes it, so loops (k folds, many runs) do not pile figures up in pyplot.
In a notebook the returned figure displays inline. The backend stays the user's:
nothing here calls ``matplotlib.use`` (``%matplotlib widget`` keeps working), and
without a display matplotlib itself falls back to Agg; saving a PNG renders it
with Agg whatever the backend.
"""

from __future__ import annotations

import os

import numpy as np

from shopee_tpu import fs


def _plt():
    import matplotlib.pyplot as plt  # slow to import: only once something is drawn

    return plt


def _finish(fig, path: str | os.PathLike | None):
    fig.tight_layout()
    if path is not None:
        with fs.atomic_path(os.fspath(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        _plt().close(fig)  # still displayable when returned to a notebook
    return fig


def plot_history(history, path=None, *, metrics=("loss", "accuracy")):
    """Loss and accuracy per epoch, training and validation.

    Args:
        history: A DataFrame (or dict of lists) with an ``epoch`` column and
            ``loss``, ``val_loss``, ``accuracy``, ``val_accuracy`` columns.
        path: Optional PNG path.
        metrics: Which metrics get a panel.
    """
    import pandas as pd

    plt = _plt()
    df = pd.DataFrame(history)
    epochs = df["epoch"] if "epoch" in df else np.arange(1, len(df) + 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
    for ax, name in zip(np.atleast_1d(axes), metrics, strict=True):
        for col, style in ((name, "-o"), (f"val_{name}", "-s")):
            if col in df:
                ax.plot(epochs, df[col], style, label=col, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return _finish(fig, path)


def plot_lr_schedule(schedule, total_steps: int, path=None, *, steps_per_epoch=None):
    """The learning rate over training, from a per-step schedule (callable)."""
    plt = _plt()
    steps = np.unique(
        np.linspace(0, max(total_steps - 1, 0), num=min(total_steps, 400))
    )
    lrs = [float(schedule(int(s))) for s in steps.astype(int)]
    x = steps / steps_per_epoch if steps_per_epoch else steps
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(x, lrs)
    ax.set_xlabel("epoch" if steps_per_epoch else "step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` pairs into a ``num_classes`` square matrix."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def plot_confusion_matrix(
    y_true, y_pred, class_names, path=None, *, max_classes: int = 20
):
    """A row-normalised confusion matrix.

    With more than ``max_classes`` classes the full matrix is unreadable, so only
    the classes involved in the most frequent confusions are shown.
    """
    plt = _plt()
    names = list(class_names)
    cm = confusion_matrix(y_true, y_pred, len(names))
    keep = np.arange(len(names))
    title = "confusion matrix (row-normalised)"
    if len(names) > max_classes:
        off = cm.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(off, axis=None)[::-1]
        chosen: list[int] = []
        for flat in order:
            for c in np.unravel_index(flat, off.shape):
                if int(c) not in chosen:
                    chosen.append(int(c))
            if len(chosen) >= max_classes:
                break
        keep = np.array(sorted(chosen[:max_classes]))
        title = f"top confused classes ({len(keep)} of {len(names)})"
    sub = cm[np.ix_(keep, keep)].astype(float)
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
    labels = [str(names[i]) for i in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=90)
    ax.set_yticks(range(len(keep)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(keep) <= 12:
        for i in range(len(keep)):
            for j in range(len(keep)):
                ax.text(j, i, f"{sub[i, j]:.2f}", ha="center", va="center", fontsize=7)
    return _finish(fig, path)


def pick_samples(y_true, y_pred, n: int = 16) -> np.ndarray:
    """Indices for a grid of predictions: the errors first, then correct ones
    taking the classes in turn, so the grid shows a mix of classes."""
    y_true = np.asarray(y_true, int)
    y_pred = np.asarray(y_pred, int)
    wrong = np.flatnonzero(y_true != y_pred)[:n]
    right = np.flatnonzero(y_true == y_pred)
    # Rank of each correct example within its class: 0 for the first of a class.
    order = np.argsort(y_true[right], kind="stable")
    sorted_cls = y_true[right][order]
    starts = np.searchsorted(sorted_cls, sorted_cls, side="left")
    rank = np.empty(len(right), int)
    rank[order] = np.arange(len(right)) - starts
    right = right[np.lexsort((y_true[right], rank))]
    return np.concatenate([wrong, right[: n - len(wrong)]]).astype(int)


class PredictionSamples:
    """Keeps a few examples while predictions stream by, for :func:`plot_predictions`.

    Memory stays bounded however large the data: every error up to ``n``, and
    correct examples up to two per class and ``4 n`` in all (as uint8).
    """

    def __init__(self, n: int = 16):
        self.n = n
        self.images: list[np.ndarray] = []
        self.y_true: list[int] = []
        self.probs: list[np.ndarray] = []
        self._errors = 0
        self._per_class: dict[int, int] = {}

    def add(self, images, y_true, probs) -> None:
        """Offers a batch: images ``[b, h, w, c]`` (0..255), true class ids, probs."""
        images, probs = np.asarray(images), np.asarray(probs)
        for img, t, p in zip(images, np.asarray(y_true, int), probs, strict=True):
            if int(np.argmax(p)) != t:
                if self._errors >= self.n:
                    continue
                self._errors += 1
            else:
                kept = len(self.y_true) - self._errors
                if self._per_class.get(t, 0) >= 2 or kept >= 4 * self.n:
                    continue
                self._per_class[t] = self._per_class.get(t, 0) + 1
            self.images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
            self.y_true.append(int(t))
            self.probs.append(np.asarray(p, np.float32))

    def plot(self, class_names, path=None):
        """The grid (see :func:`plot_predictions`); ``None`` when nothing was kept."""
        if not self.images:
            return None
        return plot_predictions(
            np.stack(self.images),
            np.array(self.y_true),
            np.stack(self.probs),
            class_names,
            path,
            n=self.n,
        )


def plot_predictions(images, y_true, probs, class_names, path=None, *, n: int = 16):
    """A grid of ``n`` examples with their predicted and true classes: the errors
    first (in red), then correct predictions (in green) from the classes in turn.

    Args:
        images: ``[N, h, w, c]`` pixels, any range (shown stretched to 0..1).
        y_true: ``[N]`` true class ids.
        probs: ``[N, classes]`` predicted probabilities.
        class_names: Name of each class id.
        path: Optional PNG path.
        n: Examples shown (fewer when ``N`` is smaller).
    """
    plt = _plt()
    names = list(class_names)
    probs = np.asarray(probs)
    y_true = np.asarray(y_true, int)
    picks = pick_samples(y_true, probs.argmax(-1), n)
    images, probs, y_true = np.asarray(images)[picks], probs[picks], y_true[picks]
    cols = int(np.ceil(np.sqrt(max(len(images), 1))))
    rows = int(np.ceil(max(len(images), 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, p, t in zip(axes.ravel(), images, probs, y_true, strict=False):
        pred = int(np.argmax(p))
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        ax.imshow((img - lo) / max(hi - lo, 1e-6))
        ok = pred == int(t)
        ax.set_title(
            f"pred {names[pred]} ({p[pred]:.2f})\ntrue {names[int(t)]}",
            color="green" if ok else "red",
            fontsize=8,
        )
    wrong = int(np.sum(probs.argmax(-1) != y_true))
    fig.suptitle(f"{wrong} of {len(images)} shown are wrong (errors first)", fontsize=9)
    return _finish(fig, path)


def show_batch(dataset, label_map=None, n: int = 16, path=None):
    """A grid of the first ``n`` images of one batch, titled with their labels.

    Args:
        dataset: A batched dataset of ``(images, labels)`` from
            ``shopee_tpu.data.load_dataset`` (or any iterable of such pairs). Labels
            may be one-hot/soft (titled with the top class, and its weight when
            mixed), integer classes, or id strings (prediction mode).
        label_map: ``{category: class_id}`` (e.g. ``manifest["label_map"]``) to show
            category names instead of class ids.
        n: How many images.
        path: Optional PNG path.
    """
    plt = _plt()
    images, labels = next(iter(dataset))
    images = np.asarray(images)[:n].astype(np.float32)
    labels = np.asarray(labels)[:n]
    names = {int(v): str(k) for k, v in (label_map or {}).items()}
    # Any value range (0..255, 0..1, -1..1) is shown as 0..1.
    lo, hi = float(images.min()), float(images.max())
    if lo >= 0 and hi > 1:
        lo, hi = 0.0, 255.0
    shown = np.clip((images - lo) / max(hi - lo, 1e-6), 0, 1)
    cols = int(np.ceil(np.sqrt(len(shown))))
    rows = int(np.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, lab in zip(axes.ravel(), shown, labels, strict=False):
        ax.imshow(img)
        if labels.dtype.kind in "SUO":  # ids
            text = lab.decode() if isinstance(lab, bytes) else str(lab)
            text = text if len(text) <= 14 else text[:11] + "..."
        elif labels.ndim == 2:
            top = int(np.argmax(lab))
            text = names.get(top, str(top))
            if lab[top] < 0.999:
                text += f" ({lab[top]:.2f})"
        else:
            text = names.get(int(lab), str(int(lab)))
        ax.set_title(text, fontsize=8)
    return _finish(fig, path)


def plot_tta_report(report, path=None):
    """Bars of validation accuracy per TTA view, reducer and growing view set.

    Args:
        report: The DataFrame of ``shopee_tpu.inference.report.tta_report`` (columns
            ``kind``, ``name``, ``accuracy``; the first row is the baseline).
        path: Optional PNG path.
    """
    import pandas as pd

    plt = _plt()
    df = pd.DataFrame(report).reset_index(drop=True)
    colours = {"view": "tab:blue", "reducer": "tab:orange", "cumulative": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(df) + 1.2))
    y = np.arange(len(df))[::-1]
    ax.barh(y, df["accuracy"], color=[colours.get(k, "grey") for k in df["kind"]])
    ax.set_yticks(y, [f"{k}: {n}" for k, n in zip(df["kind"], df["name"], strict=True)])
    base = float(df["accuracy"].iloc[0])
    ax.axvline(base, color="black", linewidth=0.8, linestyle="--")
    lo, hi = float(df["accuracy"].min()), float(df["accuracy"].max())
    pad = max(0.01, (hi - lo) * 0.5)
    # Room on the right for the labels (the axis may pass 1.0; bars never do).
    ax.set_xlim(max(0.0, lo - pad), hi + 3 * pad)
    for yi, acc in zip(y, df["accuracy"], strict=True):
        ax.text(acc, yi, f" {acc:.4f} ({acc - base:+.4f})", va="center", fontsize=7)
    ax.set_xlabel("validation accuracy (dashed line: first view alone)")
    ax.set_title("test-time augmentation")
    return _finish(fig, path)


def plot_sweep(results, keys, metric: str = "best_val_accuracy", path=None):
    """The accuracy of every sweep point against each changed key.

    One panel per key: its values along x (in grid order) and one line per
    combination of the other keys' values, so interactions show as non-parallel
    lines. The figure is closed after saving (sweeps draw many).

    Args:
        results: The table of ``shopee_tpu.experiments.sweep.run_sweep``.
        keys: The changed config keys (columns of ``results``).
        metric: The column to plot.
        path: Optional PNG path.
    """
    import pandas as pd

    plt = _plt()
    df = pd.DataFrame(results)
    keys = list(keys)
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False
    )
    for ax, key in zip(axes[0], keys, strict=True):
        values = list(dict.fromkeys(df[key].astype(str)))
        others = [k for k in keys if k != key]
        series = df.groupby(others, sort=False) if others else [((), df)]
        for combo, part in series:
            combo = combo if isinstance(combo, tuple) else (combo,)
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo, strict=True))
            x = [values.index(v) for v in part[key].astype(str)]
            ax.plot(x, part[metric], "-o", label=label or metric, markersize=5)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep: {metric}")
    _finish(fig, path)
    if path is not None:
        plt.close(fig)
    return fig
