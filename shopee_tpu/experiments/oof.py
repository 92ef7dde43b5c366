"""Gathering a k-fold run's folds: ``RUN/oof.npz``, the per-fold table and the
hold-out scores of ``RUN/metrics.json``.

Each ``RUN/fold-<i>/`` holds ``oof.npz`` (the fold model's probabilities of its
held-out records) and, with ``data.valid`` set, ``holdout.npz`` (its probabilities
of the external hold-out). ``gather_folds`` joins the former into one row per
training record, in the record order of ``folds.csv``, and scores both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.inference.ensemble import (
    align_probs,
    combine_folds,
    first_difference,
    load_probs,
    save_probs,
)
from shopee_tpu.run_folder import RunFolder

__all__ = ["OOF", "HOLDOUT", "product_keys", "gather_folds", "format_fold_table"]

OOF = "oof.npz"
HOLDOUT = "holdout.npz"


def product_keys(ids: pd.Series, groups: pd.Series) -> np.ndarray:
    """Product keys; an image without a product is its own product."""
    return np.where(groups != "", "g:" + groups, "i:" + ids)


def gather_folds(
    folder: RunFolder, config: RunConfig, assignment, *, write: bool
) -> dict:
    """``RUN/oof.npz`` (every record once, in record order) and the metrics."""
    k = config.data.folds
    parts = [load_probs(fs.join(folder.fold(i), OOF)) for i in range(k)]
    ids = np.concatenate([p.ids.astype(str) for p in parts])
    want = assignment["id"].to_numpy(str)
    if len(ids) != len(want) or set(ids.tolist()) != set(want.tolist()):
        raise ValueError(
            f"{folder.path}: the folds' out-of-fold files do not cover the records once "
            f"({len(ids)} rows for {len(want)} records; first differing id "
            f"{first_difference(want, ids, ('the records', 'the folds'))})"
        )
    # Rows in record order, so oof.npz lines up with folds.csv.
    position = {key: n for n, key in enumerate(ids.tolist())}
    order = np.array([position[key] for key in want.tolist()])
    probs = np.concatenate([p.probs for p in parts])[order]
    labels = np.concatenate([p.labels for p in parts])[order]
    fold_of = np.concatenate([p.rows["folds"] for p in parts])[order]
    if not np.array_equal(fold_of, assignment["fold"].to_numpy()):
        raise ValueError(
            f"{folder.path}: an out-of-fold file holds another fold's records"
        )
    if write:
        folder.save_label_map(RunFolder(folder.fold(0), writable=False).label_map())
        meta = {**parts[0].meta, "folds": k, "run": folder.path}
        meta.pop("fold", None)
        rows = {"labels": labels, "folds": fold_of}
        save_probs(folder.file(OOF), want, probs, meta=meta, rows=rows)
    correct = probs.argmax(-1) == labels
    per_fold = _per_fold(folder, k, assignment, fold_of, correct)
    metrics = {
        "complete": True,
        "folds": k,
        "seed": config.seed,
        "oof_images": len(want),
        "oof_accuracy": round(float(correct.mean()), 4),
        "tta": list(config.predict.tta),
        "reduce": config.predict.reduce,
        "per_fold": per_fold,
        "train_time_sec": round(sum(r["train_time_sec"] for r in per_fold), 1),
    }
    if config.data.valid:
        metrics["holdout"] = _score_holdout(folder, config)
    return metrics


def _per_fold(folder: RunFolder, k: int, assignment, fold_of, correct) -> list[dict]:
    products = product_keys(assignment["id"], assignment["group"])
    rows = []
    for i in range(k):
        fold_folder = RunFolder(folder.fold(i), writable=False)
        m, mine = fold_folder.metrics(), fold_of == i
        rows.append(
            {
                "fold": i,
                "train_images": m.get("train_images"),
                "valid_images": int(mine.sum()),
                "products": len(set(products[mine].tolist())),
                "epochs": m.get("epochs_completed"),
                "best_epoch": m.get("best_epoch"),
                "best_val_accuracy": _round(m.get("best_val_accuracy")),
                "oof_accuracy": round(float(correct[mine].mean()), 4),
                "train_time_sec": round(
                    sum(r.get("epoch_time_sec", 0.0) for r in fold_folder.history), 1
                ),
            }
        )
    return rows


def _score_holdout(folder: RunFolder, config: RunConfig) -> dict:
    """Each fold model alone and the fold ensemble on the external hold-out."""
    paths = [fs.join(folder.fold(i), HOLDOUT) for i in range(config.data.folds)]
    ids, stacked = align_probs([load_probs(p) for p in paths], names=paths)
    info = read_ids_labels(config.data.valid, schema=config.data.schema)
    truth = info.set_index(info["id"].astype(str))["label"]
    labels = truth.reindex(ids.astype(str)).to_numpy()
    if np.any(pd.isna(labels)) or np.any(labels < 0):
        raise ValueError(f"{config.data.valid}: the hold-out records need labels")
    singles = [float((p.argmax(-1) == labels).mean()) for p in stacked]
    ensemble = combine_folds(stacked, config.predict.reduce)
    return {
        "records": config.data.valid,
        "images": len(ids),
        "fold_ensemble_accuracy": round(
            float((ensemble.argmax(-1) == labels).mean()), 4
        ),
        "single_fold_accuracy": [round(a, 4) for a in singles],
        "single_fold_accuracy_mean": round(float(np.mean(singles)), 4),
    }


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def format_fold_table(metrics: dict) -> str:
    """The per-fold table of a finished k-fold run as Markdown."""
    cols = ["fold", "train_images", "valid_images", "epochs", "best_epoch"]
    cols += ["best_val_accuracy", "oof_accuracy", "train_time_sec"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in metrics["per_fold"]:
        lines.append("| " + " | ".join(str(row.get(c)) for c in cols) + " |")
    lines.append(
        f"\nout-of-fold accuracy {metrics['oof_accuracy']} over "
        f"{metrics['oof_images']} records ({metrics['folds']} folds)"
    )
    hold = metrics.get("holdout")
    if hold:
        lines.append(
            f"hold-out ({hold['images']} images): fold ensemble "
            f"{hold['fold_ensemble_accuracy']}, single fold models "
            f"{hold['single_fold_accuracy']} (mean {hold['single_fold_accuracy_mean']})"
        )
    return "\n".join(lines)
