"""``predict_run``: a training run folder + test TFRecords -> a validated submission.

What ``shopee-tpu predict --run RUN --data TEST_RECORDS`` calls. It rebuilds the
model from the run's ``config.json`` and ``label_map.json``, loads
``best.weights.h5`` (``last.weights.h5`` if there is no best), predicts the test
records (written by ``shopee-tpu tfrecords --test``; their ids are the filenames)
with TTA, optionally applies the MD5 duplicate dictionary, and writes:

- ``out`` (the submission, validated: each test id exactly once), and
- ``<out without .csv>.probs.npz``: the float16 probabilities with their ids, for
  ensembles (``shopee_tpu.inference.ensemble.combine_models``) and stacking.

A k-fold run folder (``shopee-tpu train --folds K``) predicts with each of its fold
models and averages them (geometrically for ``reduce="geometric"``); its
probabilities file has the layout of the run's ``oof.npz``, so both feed
``shopee-tpu stack``.

The run folder is only read, so it may sit in a read-only Kaggle input or be a run
still training.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shopee_tpu import fs, multihost
from shopee_tpu.accelerator import connect
from shopee_tpu.data.manifests import manifest_beside
from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.data.read.files import count_records, list_files
from shopee_tpu.data.read.pipeline import eval_dataset  # TensorFlow
from shopee_tpu.inference import md5 as md5_lib
from shopee_tpu.inference.ensemble import combine_folds, save_probs
from shopee_tpu.inference.products import write_product_submission
from shopee_tpu.inference.submission import (
    output_stem,
    resolve_format,
    write_image_submission,
)
from shopee_tpu.inference.tta import predict
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.shared_folder import check_shared

__all__ = ["predict_run", "load_run_model"]


def load_run_model(
    run_dir: str | os.PathLike, *, weights: str = "best", accelerator=None
):
    """Rebuilds a run's model with its saved weights.

    Args:
        run_dir: The run folder written by ``shopee_tpu.train`` (local or gs://).
        weights: ``best`` (falls back to ``last`` when absent) or ``last``.
        accelerator: Build inside this accelerator's scope.

    Returns:
        ``(model, config, label_map, image_size)``.
    """
    from shopee_tpu.models import build_from_config, input_spec, load_weights  # Keras

    folder = RunFolder(run_dir, writable=False)
    config, label_map = folder.config(), folder.label_map()
    path = folder.weights(weights)
    image_size = config.data.image_size or input_spec(config.model.backbone).size
    scope = accelerator.scope() if accelerator is not None else _null()
    with scope:
        # The run's own weights replace any pretrained ones: build the architecture
        # only, so neither a download nor the original weights file is needed.
        model = build_from_config(
            config.model, len(label_map), image_size=image_size, pretrained=False
        )
    with fs.local_copy(path) as local:
        # Strict: weights of another class count than label_map.json are an error.
        load_weights(model, local, head="strict")
    return model, config, label_map, image_size


def _null():
    return contextlib.nullcontext()


@dataclass
class _Prediction:
    """The test records' ids and (fold-averaged) probabilities, and their run."""

    ids: np.ndarray
    probs: np.ndarray
    config: object
    label_map: dict[str, int]
    tta: tuple[str, ...]
    reduce: str
    members: list[str]


def _predict_members(
    members, files, tta, reduce, batch_size, weights, accelerator, verbose
) -> _Prediction:
    """Every member run (one, or a k-fold run's folds) predicts the records; the
    folds' probabilities are averaged."""
    probs, ids, first = [], None, None
    for member in members:
        model, config, label_map, image_size = load_run_model(
            member, weights=weights, accelerator=accelerator
        )
        if first is None:
            first = (config, label_map, image_size)
            tta = tuple(tta or config.predict.tta)
            reduce = reduce or config.predict.reduce
            per_replica = batch_size or config.predict.batch_size or config.batch_size
            dataset = eval_dataset(
                files,
                schema=config.data.schema,
                image_size=image_size,
                batch_size=accelerator.batch_size(per_replica),
                num_classes=len(label_map),
            )
        elif label_map != first[1]:
            raise ValueError(f"{member}: label map differs from {members[0]}'s")
        member_ids, p = predict(
            model,
            dataset,
            tta,
            reduce,
            config.predict.beta,
            verbose=verbose and accelerator.chief,
        )
        if ids is not None and member_ids.tolist() != ids.tolist():
            raise ValueError(f"{member}: predicted the records in another order")
        ids = member_ids
        probs.append(p)
        del model
    combined = probs[0] if len(probs) == 1 else combine_folds(np.stack(probs), reduce)
    return _Prediction(ids, combined, first[0], first[1], tta, reduce, members)


def _probs_path(out: str) -> str:
    return f"{output_stem(out)}.probs.npz"


def predict_run(
    run_dir: str | os.PathLike,
    data: str | Sequence[str],
    *,
    out: str | os.PathLike = "submission.csv",
    tta: Sequence[str] | None = None,
    reduce: str | None = None,
    batch_size: int | None = None,
    format: str = "auto",
    probability: bool = False,
    md5_dict="auto",
    product_reduce: str = "sum",
    expected=None,
    weights: str = "best",
    device: str | None = None,
    accelerator=None,
    verbose: bool = True,
) -> pd.DataFrame:
    """Predicts test records with a trained run and writes a validated submission.

    Args:
        run_dir: The training run folder.
        data: Test TFRecords (folder, glob, file or list) from ``tfrecords --test``.
        out: Submission CSV path; probabilities go to ``<stem>.probs.npz`` beside it.
        tta: Views (default: the run config's ``predict.tta``).
        reduce: ``mean``, ``geometric`` or ``beta`` (default: the config's).
        batch_size: Per-replica batch (default: ``predict.batch_size``, else the
            training batch size).
        format: ``auto`` (``shopee`` when the classes are numbers, else
            ``named``), ``shopee`` (``filename,category``, two-digit numbers, one
            row per image), ``named`` (``filename,category`` with the class names)
            or ``cdiscount`` (``_id,category_id``, images aggregated by product
            group); see ``shopee_tpu.inference.submission``.
        probability: ``named``: add a column with the probability of each row's
            class.
        md5_dict: An ``Md5Dictionary`` or its ``.npz`` path, built from the
            training records: known duplicates override predictions (images; and
            whole products for ``cdiscount``). ``"auto"``: the dictionary the run's
            training records declare in their manifest (``cdiscount prepare``
            writes ``md5.npz``), if any; ``None``: no overrides.
        product_reduce: ``sum``, ``mean`` or ``geometric`` for ``cdiscount``.
        expected: Ids that must each appear once (``test.csv`` path, frame or list);
            by default the ids of the test records themselves, or for
            ``cdiscount`` every product of the test records' ``products.csv``
            (``cdiscount prepare-test``), those without a usable image included.
        weights: ``best`` or ``last``.
        device: The device for ``connect()`` (default: ``SHOPEE_TPU_DEVICE``, else
            detection); the run config's ``device`` is not used, as the folder
            is read only after connecting (see ``_open_run``).
        accelerator: An ``Accelerator`` to reuse instead of connecting.
        verbose: Print a summary.

    Returns:
        The submission as a DataFrame; ``df.attrs["summary"]`` counts images,
        products and MD5 hits.
    """
    out = os.fspath(out)
    folder, accelerator = _open_run(run_dir, device, accelerator, verbose)
    # A format that cannot take the run's classes fails before the prediction.
    first = RunFolder((folder.folds() or [folder.path])[0], writable=False)
    resolve_format(format, first.label_map(), probability=probability)
    files, pred = _predict_records(
        folder, data, tta, reduce, batch_size, weights, accelerator, verbose
    )
    chief = accelerator.chief  # on several hosts each predicts, the chief writes
    if chief:
        _save_probs(out, folder, pred)
    fmt = resolve_format(format, pred.label_map, probability=probability)
    df = _submission(
        pred, files, out if chief else None, fmt, md5_dict, product_reduce,
        expected, verbose and chief, probability,
    )  # fmt: skip
    if verbose and chief:
        print(
            f"{out}: {len(df)} rows ({json.dumps(df.attrs['summary'])}); "
            f"probabilities in {_probs_path(out)}"
        )
    return df


def _open_run(run_dir, device, accelerator, verbose):
    """The run folder, opened after connecting: reading a remote folder may
    import TensorFlow, which starts Keras on it, and on a TPU VM only JAX
    reaches the TPU. Every host must see the folder. Connecting here, the run's
    own precision applies (its device setting does not: the folder is read
    after the device is chosen)."""
    own = accelerator is None
    if own and not fs.is_remote(run_dir) and multihost.multi_host_reason() is None:
        # One host and a local folder (read without TensorFlow): a wrong path
        # fails at once, not after the seconds connect() takes. Several hosts
        # join first, so that all of them refuse a folder together.
        RunFolder(run_dir, writable=False).config()
    if own:
        accelerator = connect(device, verbose=False)
    check_shared(accelerator, os.fspath(run_dir), chief_writes=False)
    folder = RunFolder(run_dir, writable=False)
    if own:
        accelerator.set_precision(folder.config().mixed_precision)
        if verbose:
            print(accelerator.summary)
    return folder, accelerator


def _predict_records(
    folder: RunFolder, data, tta, reduce, batch_size, weights, accelerator, verbose
) -> tuple[list[str], _Prediction]:
    """The test files, and the run's (or its fold models') prediction of each of
    their records exactly once."""
    members = folder.folds() or [folder.path]
    files = list_files(data)
    if not files:
        raise FileNotFoundError(f"{data}: no TFRecord files")
    pred = _predict_members(
        members, files, tta, reduce, batch_size, weights, accelerator, verbose
    )
    n_records = count_records(files)
    if len(pred.ids) != n_records or len(set(pred.ids.tolist())) != len(pred.ids):
        raise ValueError(
            f"{data}: predicted {len(pred.ids)} rows "
            f"({len(set(pred.ids.tolist()))} distinct ids) for {n_records} records"
        )
    return files, pred


def _save_probs(out: str, folder: RunFolder, pred: _Prediction) -> None:
    """``<stem>.probs.npz``: the float16 probabilities with their ids and notes."""
    meta = {"run": folder.path, "tta": list(pred.tta), "reduce": pred.reduce}
    meta["label_map"] = pred.label_map
    if len(pred.members) > 1:
        meta["folds"] = len(pred.members)
    save_probs(_probs_path(out), pred.ids, pred.probs, dtype="float16", meta=meta)


def _submission(
    pred, files, out, fmt, md5_dict, product_reduce, expected, verbose, probability
):
    """Scores labelled records, applies the MD5 overrides and writes the format."""
    config, probs, ids = pred.config, pred.probs, pred.ids
    summary = {"images": len(ids)}
    info = read_ids_labels(files, schema=config.data.schema)
    if info["id"].astype(str).tolist() != ids.tolist():
        raise ValueError(f"{files[0]}: read_ids_labels order differs from the dataset")
    if _labelled(files):
        # Labelled records (a hold-out): score the probabilities, before any MD5
        # overrides, so runs and fold ensembles compare like with like.
        correct = probs.argmax(-1) == info["label"].to_numpy()
        summary["accuracy"] = round(float(correct.mean()), 4)
    dictionary = _md5_dictionary(md5_dict, config, pred.label_map, verbose)
    if dictionary is not None:
        probs, summary["md5_images"] = md5_lib.apply_image_overrides(
            probs, info["md5"].tolist(), dictionary
        )
    if not fmt.per_product:
        expected = ids if expected is None else expected
        df = write_image_submission(
            out, ids, probs, pred.label_map, format=fmt.name,
            probability=probability, expected=expected,
        )  # fmt: skip
    else:
        df, products = write_product_submission(
            out, ids, info["group"].astype(str), probs, pred.label_map, files,
            product_reduce=product_reduce, expected=expected,
            dictionary=dictionary, md5s=info["md5"].tolist(),
        )  # fmt: skip
        summary.update(products)
    df.attrs["summary"] = summary
    return df


def _labelled(files: Sequence[str]) -> bool:
    """True when our manifest says the records carry labels (not ``--test``)."""
    manifest = manifest_beside(files[0])
    return manifest.get("test") is False and bool(manifest.get("label_map"))


def _md5_dictionary(md5_dict, config, label_map, verbose):
    """The dictionary asked for (``"auto"``: the one the training records declare)."""
    if isinstance(md5_dict, str) and md5_dict == "auto":
        md5_dict = _declared_md5_dictionary(config.data.train)
        if md5_dict is not None and verbose:
            print(f"MD5 dictionary: {md5_dict} (declared by the training records)")
    if md5_dict is None:
        return None
    dictionary = (
        md5_dict
        if isinstance(md5_dict, md5_lib.Md5Dictionary)
        else md5_lib.Md5Dictionary.load(md5_dict)
    )
    known = {str(k): int(v) for k, v in (dictionary.label_map or {}).items()}
    if known and known != label_map:
        raise ValueError("the MD5 dictionary was built with another label map")
    return dictionary


def _declared_md5_dictionary(train) -> str | None:
    """The MD5 dictionary named by the manifest of the training records, if any."""
    if not train:
        return None
    try:
        first = list_files(train)[0]
    except (FileNotFoundError, ValueError):
        return None
    name = manifest_beside(first).get("md5_dictionary")
    path = fs.join(first.rsplit("/", 1)[0], name) if name else None
    return path if path and not fs.is_remote(path) and os.path.exists(path) else None
