"""K-fold training: out-of-fold probabilities for stacking, and fold ensembles.

``train_folds(cfg, folds=5)`` (``shopee-tpu train --folds 5``) splits the training
records into K folds by product, stratified by class and seeded by ``cfg.seed``
(``data.splits.stratified_group_kfold``), and trains one full run per fold::

    RUN/config.json        the k-fold config (data.folds = K)
    RUN/folds.csv          id, group, label and fold of every training record
    RUN/fold-<i>/          a complete train() run folder (its config has data.fold = i)
    RUN/fold-<i>/oof.npz   the fold model's TTA probabilities of its held-out records
    RUN/oof.npz            every training record once: ids, labels, folds, probs
    RUN/metrics.json       out-of-fold accuracy and a per-fold table

Fold i trains on the other folds' records and picks its best epoch on its own: the
driver hands ``train()`` the ids of both sides, chosen inside ``tf.data``, so
nothing is copied. Rerunning resumes fold by fold: finished folds are skipped and
an interrupted fold continues from its last epoch. ``fold=i`` (``--fold i``) trains
one fold only, so folds can train in parallel Kaggle sessions; copy the
``fold-<i>`` folders into one RUN and run again without ``--fold`` to gather them
(``experiments.oof``).

With ``data.valid`` set, those records are an external hold-out: every fold model
and the fold ensemble are scored on them (``metrics.json["holdout"]``), which shows
what the K trainings bought over one model. ``shopee-tpu predict --run RUN`` averages
the fold models (``inference.run.predict_run``).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.data.read.files import list_files
from shopee_tpu.data.read.pipeline import eval_dataset  # TensorFlow
from shopee_tpu.data.splits import stratified_group_kfold
from shopee_tpu.experiments.oof import (
    HOLDOUT,
    OOF,
    format_fold_table,
    gather_folds,
    product_keys,
)
from shopee_tpu.inference.ensemble import first_difference, save_probs
from shopee_tpu.inference.tta import predict
from shopee_tpu.run_folder import RunFolder, fold_path
from shopee_tpu.shared_folder import check_shared
from shopee_tpu.training import TrainOptions, train
from shopee_tpu.training.options import (
    accelerator_for,
    check_options,
    time_left,
    verbosity,
)

__all__ = ["KFoldResult", "train_folds", "fold_assignment", "fold_ids"]


@dataclass
class KFoldResult:
    """What ``train_folds`` returns.

    Attributes:
        metrics: What ``RUN/metrics.json`` holds (``complete`` is False until every
            fold has finished; then ``oof_accuracy`` and ``per_fold`` are filled).
        out_dir: The k-fold run folder.
        folds_done: Folds whose model and out-of-fold file are in ``out_dir``.
    """

    metrics: dict
    out_dir: str
    folds_done: list[int]

    @property
    def complete(self) -> bool:
        return bool(self.metrics.get("complete"))


# ---------------------------------------------------------------------------
# The split


def fold_assignment(files: Sequence[str], schema, folds: int, seed: int):
    """The fold of every training record, by product, stratified by class.

    Records without a product (empty ``group``) are their own product.

    Returns:
        A DataFrame ``id, group, label, fold`` in record order.

    Raises:
        ValueError: Fewer than 2 folds, more folds than products (both counts
            named), unlabelled records, or a repeated id (named).
    """
    return _assignment(tuple(files), schema, int(folds), int(seed)).copy()


@functools.lru_cache(maxsize=4)
def _assignment(files: tuple[str, ...], schema, folds: int, seed: int):
    # Cached: the driver asks again for each fold, and a scan of a large record
    # set takes a while.
    where = os.path.dirname(files[0]) or files[0]
    if folds < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {folds}")
    info = read_ids_labels(list(files), schema=schema)
    unlabelled = info["label"] < 0
    if unlabelled.any():
        first = info["id"][unlabelled].iloc[0]
        raise ValueError(
            f"{where}: {int(unlabelled.sum())} records have no label (first: {first!r}); "
            "k-fold needs labelled training records"
        )
    repeated = info["id"][info["id"].duplicated()]
    if len(repeated):
        raise ValueError(
            f"{where}: id {repeated.iloc[0]!r} appears more than once; k-fold selects "
            "records by id, so ids must be unique"
        )
    group = info["group"].astype(str)
    products = product_keys(info["id"].astype(str), group)
    n_products = len(set(products.tolist()))
    if folds > n_products:
        raise ValueError(
            f"{folds} folds, but {where} holds only {n_products} products "
            f"({len(info)} records); use at most {n_products} folds"
        )
    fold = stratified_group_kfold(info["label"].to_numpy(), products, folds, seed)
    return pd.DataFrame(
        {
            "id": info["id"].astype(str),
            "group": group,
            "label": info["label"].astype(np.int64),
            "fold": fold.astype(np.int64),
        }
    )


def fold_ids(assignment: pd.DataFrame, i: int) -> dict[str, list[str]]:
    """Ids of fold ``i``'s training and held-out records (``train(record_ids=)``)."""
    held_out = assignment["fold"] == i
    return {
        "train": assignment["id"][~held_out].tolist(),
        "valid": assignment["id"][held_out].tolist(),
    }


# ---------------------------------------------------------------------------
# The driver


def train_folds(
    config: RunConfig,
    *,
    folds: int | None = None,
    fold: int | None = None,
    out_dir: str | None = None,
    **options: Unpack[TrainOptions],
) -> KFoldResult:
    """Trains (or resumes, or gathers) a k-fold run. See the module docstring.

    Args:
        config: The run config; ``data.train`` names the training records.
        folds: K; defaults to ``config.data.folds``.
        fold: Train only this fold (then gather if every fold is present).
        out_dir: The k-fold run folder; defaults to ``config.out_dir``.
        **options: How this call trains (``shopee_tpu.training.TrainOptions``),
            handed to each fold's ``train``. The time limit is the call's, across
            folds: a fold that does not finish in time stops the run (rerun to
            continue).

    Raises:
        ValueError: Bad fold counts (see ``fold_assignment``) or ``fold`` out of range.
        ConfigMismatch: ``out_dir`` (or a gathered fold folder) holds a run with a
            different config.
        TypeError: An option that ``TrainOptions`` does not have.
    """
    check_options("train_folds", options)
    start = time.monotonic()
    verbose = verbosity(options)
    config, k = _kfold_config(config, folds, fold, out_dir)
    # Before the records are read: tf.data would start Keras on TensorFlow, and on
    # a TPU VM only JAX reaches the TPU.
    acc = accelerator_for(config, options)
    files = list_files(config.data.train)
    assignment = fold_assignment(files, config.data.schema, k, config.seed)
    folder = RunFolder(config.out_dir, writable=acc.chief)
    if acc.chief:
        _save_run_config(folder, config)
        _save_assignment(folder, assignment)
    check_shared(acc, folder.path, chief_writes=True)
    stop_reason = None
    for i in [fold] if fold is not None else range(k):
        if _fold_done(folder, i, _fold_config(config, i)):
            continue
        remaining = time_left(options, start)
        if remaining is not None and remaining <= 0:
            stop_reason = f"time limit reached before fold {i}"
            break
        if verbose:
            print(f"{config.out_dir}: training fold-{i} ({k} folds)")
        each: TrainOptions = {**options, "time_limit": remaining, "accelerator": acc}
        stop_reason = _train_fold(config, i, files, assignment, each)
        if stop_reason is not None:
            break
    return _conclude(folder, config, assignment, stop_reason, acc.chief, verbose)


def _train_fold(config, i, files, assignment, options: TrainOptions) -> str | None:
    """Trains fold ``i`` and writes its out-of-fold file; why it stopped, if it did
    not finish."""
    result = train(
        _fold_config(config, i),
        record_ids=fold_ids(assignment, i),
        fit_to_time=False,  # the limit is every fold's: it only stops
        **options,
    )
    if not result.metrics["finished"]:
        return f"fold {i}: {result.metrics.get('stop_reason')}"
    # Every host predicts (on several hosts a prediction needs all of them); the
    # chief writes, and the others wait until the fold's files are there.
    acc = options["accelerator"]
    _predict_fold(result.model, _fold_config(config, i), files, assignment, i, acc)
    acc.sync(f"shopee_tpu.kfold.fold-{i}")
    del result
    gc.collect()
    return None


def _kfold_config(config, folds, fold, out_dir) -> tuple[RunConfig, int]:
    k = config.data.folds if folds is None else int(folds)
    out_dir = os.fspath(out_dir or config.out_dir)
    config = config.replace(
        out_dir=out_dir, data=config.data.replace(folds=k, fold=None)
    )
    if not config.data.train:
        raise ValueError("config.data.train is not set: point it at a TFRecord folder")
    if k < 2:
        raise ValueError(f"k-fold needs at least 2 folds (folds=K), got {k}")
    if fs.is_remote(out_dir):
        raise ValueError(f"{out_dir}: a k-fold run folder must be a local path")
    if fold is not None and not 0 <= fold < k:
        raise ValueError(f"fold {fold} is not one of the {k} folds (0..{k - 1})")
    return config, k


def _fold_config(config: RunConfig, i: int) -> RunConfig:
    return config.replace(
        name=f"{config.name}-fold{i}",
        out_dir=fold_path(config.out_dir, i),
        data=config.data.replace(fold=i),
    )


def _fold_done(folder: RunFolder, i: int, fold_cfg: RunConfig) -> bool:
    """Whether fold ``i`` finished (with its out-of-fold file), checking that it
    trained with ``fold_cfg``."""
    path = folder.fold(i)
    if not fs.exists(fs.join(path, OOF)):
        return False
    done = RunFolder(path, writable=False)
    if not done.finished:
        return False
    saved = done.saved_config()
    if saved is not None:
        done.refuse_other(saved, fold_cfg)
    return True


def _save_run_config(folder: RunFolder, config: RunConfig) -> None:
    """Saves the k-fold config; refuses a different one once a fold has started."""
    started = any(
        fs.exists(fs.join(folder.fold(i), RunFolder.STATE))
        for i in range(config.data.folds)
    )
    saved = folder.saved_config() if started else None
    if saved is not None:
        folder.refuse_other(saved, config)
    config.save(folder.file(RunFolder.CONFIG))


def _save_assignment(folder: RunFolder, assignment: pd.DataFrame) -> None:
    """Writes folds.csv; a different saved split (the records changed) is an error."""
    path = folder.file("folds.csv")
    if not fs.exists(path):
        fs.write_text(path, assignment.to_csv(index=False))
        return
    saved = pd.read_csv(path, dtype={"id": str, "group": str}, keep_default_na=False)
    for i in sorted(set(saved["fold"]) | set(assignment["fold"])):
        a = saved["id"][saved["fold"] == i].tolist()
        b = assignment["id"][assignment["fold"] == i].tolist()
        if sorted(a) != sorted(b):
            raise ValueError(
                f"{path}: fold {i} of the saved split differs from the split of "
                "the records now (first differing id "
                f"{first_difference(a, b, ('folds.csv', 'the records'))}); "
                "the records changed since the run started: use a new --out folder"
            )


def _predict_fold(model, cfg: RunConfig, files, assignment, i: int, acc) -> None:
    """Writes the fold model's TTA probabilities of its held-out records (and of the
    external hold-out, when ``data.valid`` is set): every host predicts them all,
    the chief writes."""
    from shopee_tpu.models import input_spec

    folder = RunFolder(cfg.out_dir, writable=False)
    label_map = folder.label_map()
    common = dict(
        schema=cfg.data.schema,
        image_size=cfg.data.image_size or input_spec(cfg.model.backbone).size,
        batch_size=acc.batch_size(cfg.predict.batch_size or cfg.batch_size),
        num_classes=len(label_map),
    )
    tta, reduce, beta = cfg.predict.tta, cfg.predict.reduce, cfg.predict.beta
    meta = {"fold": i, "tta": list(tta), "reduce": reduce, "label_map": label_map}
    held_out = assignment[assignment["fold"] == i]
    ds = eval_dataset(files, keep_ids=held_out["id"].tolist(), **common)
    ids, probs = predict(model, ds, tta, reduce, beta)
    if len(ids) != len(held_out) or set(ids.tolist()) != set(held_out["id"]):
        raise ValueError(
            f"{folder.path}: predicted {len(ids)} rows for the {len(held_out)} "
            "held-out records (first differing id "
            f"{first_difference(held_out['id'], ids, ('the fold', 'the predictions'))})"
        )
    labels = held_out.set_index("id")["label"].reindex(ids).to_numpy()
    rows = {"labels": labels, "folds": np.full(len(ids), i)}
    if acc.chief:
        save_probs(folder.file(OOF), ids, probs, meta=meta, rows=rows)
    if cfg.data.valid:
        ds = eval_dataset(list_files(cfg.data.valid), **common)
        ids, probs = predict(model, ds, tta, reduce, beta)
        if acc.chief:
            save_probs(folder.file(HOLDOUT), ids, probs, meta=meta)


# ---------------------------------------------------------------------------
# Gathering the folds


def _conclude(folder: RunFolder, config, assignment, stop_reason, chief: bool, verbose):
    """Gathers the folds when all are done (``metrics.json``); says what is left
    otherwise."""
    k = config.data.folds
    done = [i for i in range(k) if _fold_done(folder, i, _fold_config(config, i))]
    if len(done) < k:
        if verbose:
            missing = sorted(set(range(k)) - set(done))
            print(
                f"{folder.path}: folds {done} of {k} done; to finish, train folds "
                f"{missing} (here or in other sessions, then copy their fold-<i> "
                "folders here) and run again without --fold"
            )
        metrics = {"complete": False, "folds": k, "folds_done": done}
        return KFoldResult({**metrics, "stop_reason": stop_reason}, folder.path, done)
    metrics = gather_folds(folder, config, assignment, write=chief)
    if chief:
        folder.save_metrics(metrics)
    if verbose:
        print(format_fold_table(metrics))
    return KFoldResult(metrics, folder.path, done)
