"""``shopee-tpu stack``: a meta-learner over several runs, fitted on their
out-of-fold probabilities and applied to their test probabilities.

Each run contributes its ``oof.npz`` (``shopee-tpu train --folds K``) and the
probabilities file that ``shopee-tpu predict --run RUN`` wrote beside its
submission. Rows are matched by id, never by position; files whose ids or class
counts differ are refused with the first difference named. The meta-learner is
``inference.stacking.fit_stacker`` (a logistic regression on log-probabilities that
starts from the geometric mean of the models).

The stacked out-of-fold accuracy is cross-validated over the first run's folds (the
meta-learner predicts each fold after fitting on the others), so it is comparable
with the plain mean and each model alone, which are reported beside it. The
submission goes through the Shopee or Cdiscount writer, which validates it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.data.read.files import list_files
from shopee_tpu.data.read.pipeline import read_ids_labels
from shopee_tpu.inference.ensemble import (
    align_probs,
    arithmetic_mean,
    load_probs,
    save_probs,
)
from shopee_tpu.inference.products import write_product_submission
from shopee_tpu.inference.stacking import fit_stacker
from shopee_tpu.inference.submission import (
    output_stem,
    resolve_format,
    write_image_submission,
)

__all__ = ["stack_runs", "format_stack_report"]


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((probs.argmax(-1) == labels).mean()), 4)


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return round(float(-np.log(p).mean()), 4)


def _aligned_labels(files, names, ids: np.ndarray) -> np.ndarray:
    """The class ids of ``ids`` from every out-of-fold file; they must agree."""
    labels = None
    for f, name in zip(files, names, strict=True):
        if f.labels is None:
            raise ValueError(
                f"{name}: holds no labels; pass the oof.npz of a k-fold run "
                "(shopee-tpu train --folds K)"
            )
        mine = pd.Series(f.labels, index=f.ids.astype(str)).reindex(ids).to_numpy()
        if labels is None:
            labels = mine
        elif not np.array_equal(mine, labels):
            first = ids[np.flatnonzero(mine != labels)[0]]
            raise ValueError(
                f"{name}: the label of id {first!r} differs from {names[0]}'s; "
                "were the runs trained on the same records?"
            )
    return labels.astype(np.int64)


def _label_map(files, names) -> dict[str, int]:
    maps = [(f.meta.get("label_map"), n) for f, n in zip(files, names, strict=True)]
    known = [(m, n) for m, n in maps if m]
    if not known:
        raise ValueError(f"{names[0]}: no label map in the file's notes")
    first, first_name = known[0]
    for m, n in known[1:]:
        if m != first:
            raise ValueError(f"{n}: its label map differs from {first_name}'s")
    return {str(k): int(v) for k, v in first.items()}


def _cv_stacked(
    x: np.ndarray, labels: np.ndarray, folds: np.ndarray, **fit
) -> np.ndarray:
    """Out-of-fold predictions of the meta-learner itself."""
    out = np.zeros(x.shape[1:], np.float32)
    for f in np.unique(folds):
        held = folds == f
        stacker = fit_stacker(list(x[:, ~held]), labels[~held], **fit)
        out[held] = stacker.predict(list(x[:, held]))
    return out


def stack_runs(
    oof: Sequence[str | os.PathLike],
    test: Sequence[str | os.PathLike],
    out: str | os.PathLike = "submission.csv",
    *,
    format: str = "auto",
    data=None,
    expected=None,
    product_reduce: str = "sum",
    kind: str = "per_class",
    l2: float = 1e-4,
    steps: int = 300,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Fits the meta-learner on several runs' OOF probabilities; writes a submission.

    Args:
        oof: One ``oof.npz`` per run.
        test: The same runs' test probability files, in the same order.
        out: Submission CSV. Beside it go ``<stem>.probs.npz`` (the stacked test
            probabilities), ``<stem>.stacker.npz`` and ``<stem>.stack.json`` (this
            report).
        format: ``auto``, ``shopee`` or ``named`` (one row per image) or
            ``cdiscount`` (one row per product; needs ``data``); see
            ``shopee_tpu.inference.submission``.
        data: The test records, for their product groups (``cdiscount``).
        expected: Ids that must each appear once (``test.csv`` path, frame or list).
        product_reduce: ``sum``, ``mean`` or ``geometric`` for ``cdiscount``.
        kind: ``per_class`` or ``full`` (see ``fit_stacker``).
        l2: The meta-learner's L2 penalty.
        steps: Its Adam steps.
        seed: Seeds the meta-learner's cross-validation split when the OOF files
            carry no folds.
        verbose: Print the report table.

    Returns:
        The report: accuracy (and log loss) of each model, the mean and the stack.
    """
    oof_names, test_names = [os.fspath(p) for p in oof], [os.fspath(p) for p in test]
    _check_arguments(oof_names, test_names, format, data)
    runs = _load_runs(oof_names, test_names)
    x, labels = runs.x, runs.labels
    folds = _cv_folds(runs.oof_files[0], runs.ids, seed)
    fit = dict(kind=kind, l2=l2, steps=steps)
    cv = _cv_stacked(x, labels, folds, **fit)
    stacker = fit_stacker(list(x), labels, **fit)
    report = _report(runs, folds, cv, stacker.predict(list(x)), kind, out)

    out = os.fspath(out)
    stem = output_stem(out)
    stacked = stacker.predict(list(runs.t))
    _write_submission(out, format, runs, stacked, data, expected, product_reduce)
    meta = {"stacked": test_names, "label_map": runs.label_map, "kind": kind}
    save_probs(f"{stem}.probs.npz", runs.test_ids, stacked, meta=meta)
    stacker.save(f"{stem}.stacker.npz")
    fs.write_text(f"{stem}.stack.json", json.dumps(report, indent=1) + "\n")
    if verbose:
        print(format_stack_report(report))
    return report


def _check_arguments(oof_names, test_names, format, data) -> None:
    if len(oof_names) < 2:
        raise ValueError(f"stacking needs at least two runs, got {len(oof_names)}")
    if len(oof_names) != len(test_names):
        raise ValueError(
            f"{len(oof_names)} --oof files but {len(test_names)} --test files; give "
            "one of each per run, in the same order"
        )
    if resolve_format(format, {}).per_product and data is None:
        raise ValueError(
            "the cdiscount format needs the test records (data) for products"
        )


@dataclass
class _Runs:
    """The runs' probabilities, rows matched by id: ``x`` (models, OOF rows,
    classes) with its ``labels``, and ``t`` (models, test rows, classes)."""

    oof_names: list[str]
    test_names: list[str]
    oof_files: list
    ids: np.ndarray
    x: np.ndarray
    labels: np.ndarray
    test_ids: np.ndarray
    t: np.ndarray
    label_map: dict[str, int]


def _load_runs(oof_names: list[str], test_names: list[str]) -> _Runs:
    """Loads and aligns the files; refuses ids, labels, classes or label maps that
    differ between them."""
    oof_files = [load_probs(p) for p in oof_names]
    test_files = [load_probs(p) for p in test_names]
    ids, x = align_probs(oof_files, names=oof_names)
    ids = ids.astype(str)
    labels = _aligned_labels(oof_files, oof_names, ids)
    test_ids, t = align_probs(test_files, names=test_names)
    if t.shape[2] != x.shape[2]:
        raise ValueError(
            f"{test_names[0]}: {t.shape[2]} classes, {oof_names[0]} has {x.shape[2]}"
        )
    label_map = _label_map(oof_files + test_files, oof_names + test_names)
    if len(label_map) != x.shape[2]:
        raise ValueError(
            f"{oof_names[0]}: {x.shape[2]} classes but its label map has {len(label_map)}"
        )
    return _Runs(
        oof_names, test_names, oof_files, ids, x, labels, test_ids, t, label_map
    )


def _cv_folds(first, ids: np.ndarray, seed: int) -> np.ndarray:
    """The meta-learner's cross-validation folds: the first run's k-fold split, or
    five seeded random folds when its file carries none."""
    folds = first.rows.get("folds")
    if folds is not None:
        folds = pd.Series(folds, index=first.ids.astype(str)).reindex(ids)
        return folds.to_numpy()
    return np.random.default_rng(seed).permutation(len(ids)) % 5


def _report(runs: _Runs, folds, cv, fitted, kind: str, out) -> dict:
    """Accuracy and log loss of each model, their mean, the cross-validated stack
    and the stack fitted on every row (``fitted``)."""
    labels = runs.labels
    mean = arithmetic_mean(runs.x, axis=0)
    return {
        "models": [
            {
                "oof": o,
                "test": s,
                "oof_accuracy": _accuracy(p, labels),
                "oof_log_loss": _log_loss(p, labels),
            }
            for o, s, p in zip(runs.oof_names, runs.test_names, runs.x, strict=True)
        ],
        "mean_oof_accuracy": _accuracy(mean, labels),
        "mean_oof_log_loss": _log_loss(mean, labels),
        "stacked_oof_accuracy": _accuracy(cv, labels),
        "stacked_oof_log_loss": _log_loss(cv, labels),
        "stacked_fit_accuracy": _accuracy(fitted, labels),
        "stacker_cv_folds": int(len(np.unique(folds))),
        "oof_images": len(runs.ids),
        "test_images": len(runs.test_ids),
        "kind": kind,
        "submission": os.fspath(out),
    }


def _write_submission(
    out: str, format: str, runs: _Runs, stacked, data, expected, product_reduce
) -> None:
    """Writes (and validates) the submission of the stacked test probabilities: one
    row per image, or per product for ``cdiscount``."""
    test_ids, label_map = runs.test_ids, runs.label_map
    if not resolve_format(format, label_map).per_product:
        want = test_ids if expected is None else expected
        write_image_submission(
            out, test_ids, stacked, label_map, format=format, expected=want
        )
        return
    files = list_files(data)
    info = read_ids_labels(files)
    group = info.set_index(info["id"].astype(str))["group"].astype(str)
    groups = group.reindex(test_ids.astype(str)).fillna("").to_numpy()
    write_product_submission(
        out, test_ids.astype(str), groups, stacked, label_map, files,
        product_reduce=product_reduce, expected=expected,
    )  # fmt: skip


def format_stack_report(report: dict) -> str:
    """The report of ``stack_runs`` as a Markdown table."""
    rows = [(m["oof"], m["oof_accuracy"], m["oof_log_loss"]) for m in report["models"]]
    rows.append(
        ("mean of the models", report["mean_oof_accuracy"], report["mean_oof_log_loss"])
    )
    rows.append(
        (
            f"stacked ({report['stacker_cv_folds']}-fold cross-validated)",
            report["stacked_oof_accuracy"],
            report["stacked_oof_log_loss"],
        )
    )
    lines = ["| model | OOF accuracy | OOF log loss |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(
        f"\n{report['oof_images']} out-of-fold images; submission "
        f"{report['submission']} ({report['test_images']} test images)"
    )
    return "\n".join(lines)
