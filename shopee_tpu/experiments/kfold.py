"""K-fold training: out-of-fold probabilities for stacking, and fold ensembles.

``st.train(cfg, folds=5)`` (``shopee-tpu train --folds 5``) splits the training
records into K folds by product, stratified by class and seeded by ``cfg.seed``
(``data.splits.stratified_group_kfold``), and trains one full run per fold::

    RUN/config.json        the k-fold config (data.folds = K)
    RUN/folds.csv          id, group, label and fold of every training record
    RUN/fold-<i>/          a complete train() run folder (its config has data.fold = i)
    RUN/fold-<i>/oof.npz   the fold model's TTA probabilities of its held-out records
    RUN/oof.npz            every training record once: ids, labels, folds, probs
    RUN/metrics.json       out-of-fold accuracy and a per-fold table

Fold i trains on the other folds' records and picks its best epoch on its own. The
records are chosen inside ``tf.data`` by id (``load_dataset(keep_ids=...)``), so
nothing is copied. Rerunning resumes fold by fold: finished folds are skipped and an
interrupted fold continues from its last epoch. ``fold=i`` (``--fold i``) trains one
fold only, so folds can train in parallel Kaggle sessions; copy the ``fold-<i>``
folders into one RUN and run again without ``--fold`` to gather them.

With ``data.valid`` set, those records are an external hold-out: every fold model
and the fold ensemble are scored on them (``metrics.json["holdout"]``), which shows
what the K trainings bought over one model. ``shopee-tpu predict --run RUN`` averages
the fold models (``inference.run.predict_run``).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shopee_tpu.checkpoints import RESUME_IGNORES, ConfigMismatch
from shopee_tpu.config import RunConfig, config_diff
from shopee_tpu.utils import atomic_write_text, is_remote

__all__ = [
    "KFoldResult",
    "train_folds",
    "fold_assignment",
    "fold_ids",
    "fold_dir",
    "fold_members",
    "is_kfold",
]

OOF = "oof.npz"
HOLDOUT = "holdout.npz"


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


def is_kfold(config: RunConfig) -> bool:
    """True for the config of a whole k-fold run (not of one of its folds)."""
    return config.data.folds > 0 and config.data.fold is None


def fold_dir(run_dir: str | os.PathLike, fold: int) -> str:
    return os.path.join(os.fspath(run_dir), f"fold-{fold}")


def fold_members(run_dir: str, saved_config: dict) -> list[str]:
    """The fold folders of a k-fold run from its saved config dict; ``[]`` otherwise."""
    data = saved_config.get("data") or {}
    if not data.get("folds") or data.get("fold") is not None:
        return []
    sep = "/" if "://" in run_dir else os.sep
    return [f"{run_dir.rstrip('/')}{sep}fold-{i}" for i in range(int(data["folds"]))]


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
    # Cached: train() of each fold and the driver ask for the same split, and a
    # scan of a large record set takes a while.
    from shopee_tpu.data.pipeline import read_ids_labels
    from shopee_tpu.data.splits import stratified_group_kfold

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
    products = _products(info["id"].astype(str), group)
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


def _products(ids: pd.Series, groups: pd.Series) -> np.ndarray:
    """Product keys; an image without a product is its own product."""
    return np.where(groups != "", "g:" + groups, "i:" + ids)


def fold_ids(config: RunConfig, files: Sequence[str]) -> dict[str, list[str]]:
    """Ids of one fold's training and held-out records (what ``train()`` reads for a
    fold config: ``data.folds`` = K and ``data.fold`` = i)."""
    k, i = config.data.folds, config.data.fold
    if i is None or k < 2 or not 0 <= i < k:
        raise ValueError(
            "a fold run needs data.folds >= 2 and 0 <= data.fold < data.folds, got "
            f"data.folds={k}, data.fold={i}"
        )
    a = fold_assignment(files, config.data.schema, k, config.seed)
    held_out = a["fold"] == i
    return {"train": a["id"][~held_out].tolist(), "valid": a["id"][held_out].tolist()}


# ---------------------------------------------------------------------------
# The driver


def train_folds(
    config: RunConfig,
    *,
    folds: int | None = None,
    fold: int | None = None,
    out_dir: str | None = None,
    time_limit: float | None = None,
    checkpoint_every: float = 60.0,
    device: str | None = None,
    accelerator=None,
    verbose: int | None = None,
) -> KFoldResult:
    """Trains (or resumes, or gathers) a k-fold run. See the module docstring.

    Args:
        config: The run config; ``data.train`` names the training records.
        folds: K; defaults to ``config.data.folds``.
        fold: Train only this fold (then gather if every fold is present).
        out_dir: The k-fold run folder; defaults to ``config.out_dir``.
        time_limit: Seconds for this call across folds; a fold that does not finish
            in time stops the run (rerun to continue).
        checkpoint_every: Seconds between a fold's checkpoints (see ``train``).
        device: Overrides ``config.device``.
        accelerator: An ``Accelerator`` to reuse.
        verbose: 1 shows progress, 0 is silent.

    Raises:
        ValueError: Bad fold counts (see ``fold_assignment``) or ``fold`` out of range.
        ConfigMismatch: ``out_dir`` (or a gathered fold folder) holds a run with a
            different config.
    """
    from shopee_tpu.accelerator import connect
    from shopee_tpu.data.pipeline import list_files
    from shopee_tpu.training import train

    start = time.monotonic()
    verbose = 1 if verbose is None else verbose
    k = config.data.folds if folds is None else int(folds)
    out_dir = os.fspath(out_dir or config.out_dir)
    config = config.replace(
        out_dir=out_dir, data=config.data.replace(folds=k, fold=None)
    )
    if not config.data.train:
        raise ValueError("config.data.train is not set: point it at a TFRecord folder")
    if k < 2:
        raise ValueError(f"k-fold needs at least 2 folds (folds=K), got {k}")
    if is_remote(out_dir):
        raise ValueError(f"{out_dir}: a k-fold run folder must be a local path")
    if fold is not None and not 0 <= fold < k:
        raise ValueError(f"fold {fold} is not one of the {k} folds (0..{k - 1})")
    # Before the records are read: tf.data would start Keras on TensorFlow, and on
    # a TPU VM only JAX reaches the TPU.
    acc = accelerator or connect(
        device or config.device,
        mixed_precision=config.mixed_precision,
        verbose=verbose > 0,
    )
    files = list_files(config.data.train)
    assignment = fold_assignment(files, config.data.schema, k, config.seed)
    chief = acc.worker_index == 0
    if chief:
        _save_run_config(out_dir, config)
        _save_assignment(out_dir, assignment)

    stop_reason = None
    for i in [fold] if fold is not None else range(k):
        fold_cfg = _fold_config(config, i)
        where = fold_dir(out_dir, i)
        if _fold_done(where):
            _check_fold_config(where, fold_cfg)
            continue
        remaining = (
            None if time_limit is None else time_limit - (time.monotonic() - start)
        )
        if remaining is not None and remaining <= 0:
            stop_reason = f"time limit reached before fold {i}"
            break
        if verbose:
            print(f"{out_dir}: training fold-{i} ({k} folds)")
        result = train(
            fold_cfg,
            out_dir=where,
            time_limit=remaining,
            checkpoint_every=checkpoint_every,
            accelerator=acc,
            verbose=verbose,
        )
        if not result.metrics["finished"]:
            stop_reason = f"fold {i}: {result.metrics.get('stop_reason')}"
            break
        if chief:
            _predict_fold(result.model, fold_cfg, files, assignment, i, acc, where)
        del result
        gc.collect()

    done = [i for i in range(k) if _fold_done(fold_dir(out_dir, i))]
    if len(done) < k:
        metrics = {
            "complete": False,
            "folds": k,
            "folds_done": done,
            "stop_reason": stop_reason,
        }
        if verbose:
            missing = sorted(set(range(k)) - set(done))
            print(
                f"{out_dir}: folds {done} of {k} done; to finish, train folds {missing} "
                "(here or in other sessions, then copy their fold-<i> folders here) "
                "and run again without --fold"
            )
        return KFoldResult(metrics, out_dir, done)

    for i in range(k):
        _check_fold_config(fold_dir(out_dir, i), _fold_config(config, i))
    metrics = _gather(out_dir, config, assignment, write=chief)
    if chief:
        atomic_write_text(
            os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n"
        )
    if verbose:
        print(format_fold_table(metrics))
    return KFoldResult(metrics, out_dir, done)


def _fold_config(config: RunConfig, i: int) -> RunConfig:
    return config.replace(
        name=f"{config.name}-fold{i}",
        out_dir=fold_dir(config.out_dir, i),
        data=config.data.replace(fold=i),
    )


def _fold_done(where: str) -> bool:
    state = os.path.join(where, "state.json")
    if not (os.path.exists(state) and os.path.exists(os.path.join(where, OOF))):
        return False
    with open(state, encoding="utf-8") as f:
        return bool(json.load(f).get("finished"))


def check_saved_config(folder: str, config: RunConfig) -> RunConfig | None:
    """Returns the config saved in a run folder (None if there is none), refusing
    one that differs from ``config`` in anything that changes training.

    Raises:
        ConfigMismatch: The differences, one ``key: saved -> new`` line each.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = RunConfig.from_dict(json.load(f))
    diff = config_diff(saved, config, ignore=RESUME_IGNORES)
    if diff:
        raise ConfigMismatch(
            f"{folder} holds a run with a different config. Use a new --out "
            "folder, or undo these changes:\n  " + "\n  ".join(diff)
        )
    return saved


def _check_fold_config(where: str, fold_cfg: RunConfig) -> None:
    check_saved_config(where, fold_cfg)


def _save_run_config(out_dir: str, config: RunConfig) -> None:
    """Saves the k-fold config; refuses a different one once a fold has started."""
    started = any(
        os.path.exists(os.path.join(fold_dir(out_dir, i), "state.json"))
        for i in range(config.data.folds)
    )
    if started:
        check_saved_config(out_dir, config)
    config.save(os.path.join(out_dir, "config.json"))


def _save_assignment(out_dir: str, assignment: pd.DataFrame) -> None:
    """Writes folds.csv; a different saved split (the records changed) is an error."""
    from shopee_tpu.inference.ensemble import first_difference

    path = os.path.join(out_dir, "folds.csv")
    if os.path.exists(path):
        saved = pd.read_csv(
            path, dtype={"id": str, "group": str}, keep_default_na=False
        )
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
        return
    atomic_write_text(path, assignment.to_csv(index=False))


def _predict_fold(model, fold_cfg, files, assignment, i, acc, where) -> None:
    """Writes the fold model's TTA probabilities of its held-out records (and of the
    external hold-out, when ``data.valid`` is set)."""
    from shopee_tpu.data.pipeline import list_files, load_dataset
    from shopee_tpu.inference.ensemble import first_difference, save_probs
    from shopee_tpu.inference.tta import predict
    from shopee_tpu.models import input_spec

    cfg = fold_cfg
    with open(os.path.join(where, "label_map.json"), encoding="utf-8") as f:
        label_map = {str(k): int(v) for k, v in json.load(f).items()}
    size = cfg.data.image_size or input_spec(cfg.model.backbone).size
    per_replica = cfg.predict.batch_size or cfg.batch_size
    common = dict(
        schema=cfg.data.schema,
        image_size=size,
        batch_size=acc.batch_size(per_replica),
        training=False,
        num_classes=len(label_map),
    )
    tta, reduce, beta = cfg.predict.tta, cfg.predict.reduce, cfg.predict.beta
    meta = {"fold": i, "tta": list(tta), "reduce": reduce, "label_map": label_map}

    held_out = assignment[assignment["fold"] == i]
    ds = load_dataset(files, keep_ids=held_out["id"].tolist(), **common)
    ids, probs = predict(model, ds, tta, reduce, beta)
    if len(ids) != len(held_out) or set(ids.tolist()) != set(held_out["id"]):
        raise ValueError(
            f"{where}: predicted {len(ids)} rows for the {len(held_out)} held-out "
            "records (first differing id "
            f"{first_difference(held_out['id'], ids, ('the fold', 'the predictions'))})"
        )
    labels = held_out.set_index("id")["label"].reindex(ids).to_numpy()
    rows = {"labels": labels, "folds": np.full(len(ids), i)}
    save_probs(os.path.join(where, OOF), ids, probs, meta=meta, rows=rows)
    if cfg.data.valid:
        ds = load_dataset(list_files(cfg.data.valid), **common)
        ids, probs = predict(model, ds, tta, reduce, beta)
        save_probs(os.path.join(where, HOLDOUT), ids, probs, meta=meta)


# ---------------------------------------------------------------------------
# Gathering the folds


def _gather(out_dir: str, config: RunConfig, assignment, *, write: bool) -> dict:
    from shopee_tpu.inference.ensemble import first_difference, load_probs, save_probs

    k = config.data.folds
    parts = [load_probs(os.path.join(fold_dir(out_dir, i), OOF)) for i in range(k)]
    ids = np.concatenate([p.ids.astype(str) for p in parts])
    want = assignment["id"].to_numpy(str)
    if len(ids) != len(want) or set(ids.tolist()) != set(want.tolist()):
        raise ValueError(
            f"{out_dir}: the folds' out-of-fold files do not cover the records once "
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
        raise ValueError(f"{out_dir}: an out-of-fold file holds another fold's records")
    correct = probs.argmax(-1) == labels
    meta = {**parts[0].meta, "folds": k, "run": out_dir}
    meta.pop("fold", None)
    if write:
        with open(os.path.join(fold_dir(out_dir, 0), "label_map.json")) as f:
            atomic_write_text(os.path.join(out_dir, "label_map.json"), f.read())
        save_probs(
            os.path.join(out_dir, OOF),
            want,
            probs,
            meta=meta,
            rows={"labels": labels, "folds": fold_of},
        )

    products = _products(assignment["id"], assignment["group"])
    per_fold = []
    for i in range(k):
        with open(os.path.join(fold_dir(out_dir, i), "metrics.json")) as f:
            m = json.load(f)
        history = pd.read_csv(os.path.join(fold_dir(out_dir, i), "history.csv"))
        mine = fold_of == i
        per_fold.append(
            {
                "fold": i,
                "train_images": m.get("train_images"),
                "valid_images": int(mine.sum()),
                "products": len(set(products[mine].tolist())),
                "epochs": m.get("epochs_completed"),
                "best_epoch": m.get("best_epoch"),
                "best_val_accuracy": _round(m.get("best_val_accuracy")),
                "oof_accuracy": round(float(correct[mine].mean()), 4),
                "train_time_sec": round(float(history["epoch_time_sec"].sum()), 1),
            }
        )
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
        metrics["holdout"] = _score_holdout(out_dir, config)
    return metrics


def _score_holdout(out_dir: str, config: RunConfig) -> dict:
    """Each fold model alone and the fold ensemble on the external hold-out."""
    from shopee_tpu.data.pipeline import read_ids_labels
    from shopee_tpu.inference.ensemble import align_probs, load_probs

    k = config.data.folds
    paths = [os.path.join(fold_dir(out_dir, i), HOLDOUT) for i in range(k)]
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


def combine_folds(stacked: np.ndarray, reduce: str) -> np.ndarray:
    """Averages fold models' ``[folds, n, classes]`` probabilities: geometrically
    for ``reduce="geometric"``, else arithmetically (``beta`` weights TTA views, not
    models)."""
    from shopee_tpu.inference.ensemble import arithmetic_mean, geometric_mean

    mean = geometric_mean if reduce == "geometric" else arithmetic_mean
    return mean(np.asarray(stacked, np.float32), axis=0)


def format_fold_table(metrics: dict) -> str:
    """The per-fold table of a finished k-fold run as Markdown."""
    cols = [
        "fold",
        "train_images",
        "valid_images",
        "epochs",
        "best_epoch",
        "best_val_accuracy",
        "oof_accuracy",
        "train_time_sec",
    ]
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
