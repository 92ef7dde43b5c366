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

import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd

from shopee_tpu.utils import is_remote

__all__ = ["predict_run", "load_run_model"]

FORMATS = ("shopee", "cdiscount")


def _join(folder: str, name: str) -> str:
    return (
        f"{folder.rstrip('/')}/{name}"
        if is_remote(folder)
        else os.path.join(folder, name)
    )


def _exists(path: str) -> bool:
    if is_remote(path):
        from shopee_tpu.utils import require_tensorflow

        return require_tensorflow().io.gfile.exists(path)
    return os.path.exists(path)


def _read_json(path: str) -> dict:
    if not _exists(path):
        raise FileNotFoundError(f"{path}: missing; is this a training run folder?")
    if is_remote(path):
        from shopee_tpu.utils import require_tensorflow

        with require_tensorflow().io.gfile.GFile(path) as f:
            text = f.read()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


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
    from shopee_tpu.config import RunConfig
    from shopee_tpu.models import build_from_config, input_spec, load_weights

    run_dir = os.fspath(run_dir)
    config = RunConfig.from_dict(_read_json(_join(run_dir, "config.json")))
    label_map = {
        str(k): int(v) for k, v in _read_json(_join(run_dir, "label_map.json")).items()
    }
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise ValueError(
            f"{run_dir}/label_map.json: class ids are not 0..{len(label_map) - 1}"
        )
    names = {
        "best": ["best.weights.h5", "last.weights.h5"],
        "last": ["last.weights.h5"],
    }
    if weights not in names:
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    found = [_join(run_dir, n) for n in names[weights] if _exists(_join(run_dir, n))]
    if not found:
        raise FileNotFoundError(
            f"{run_dir}: no {' or '.join(names[weights])}; train first"
        )
    image_size = config.data.image_size or input_spec(config.model.backbone).size
    scope = accelerator.scope() if accelerator is not None else _null()
    with scope:
        # The run's own weights replace any pretrained ones: build the architecture
        # only, so neither a download nor the original weights file is needed.
        model = build_from_config(
            config.model, len(label_map), image_size=image_size, pretrained=False
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = found[0]
        if is_remote(local):
            from shopee_tpu.utils import require_tensorflow

            local = os.path.join(tmp, os.path.basename(found[0]))
            require_tensorflow().io.gfile.copy(found[0], local)
        # Strict: weights of another class count than label_map.json are an error.
        load_weights(model, local, head="strict")
    return model, config, label_map, image_size


def _null():
    import contextlib

    return contextlib.nullcontext()


def _fold_ensemble(
    members, first, ids, dataset, label_map, tta, reduce, weights, accelerator, verbose
):
    """Adds the other fold models' predictions to the first fold's and averages."""
    from shopee_tpu.experiments.kfold import combine_folds
    from shopee_tpu.inference.tta import predict

    probs = [first]
    for member in members[1:]:
        model, config, other_map, _ = load_run_model(
            member, weights=weights, accelerator=accelerator
        )
        if other_map != label_map:
            raise ValueError(f"{member}: label map differs from {members[0]}'s")
        other_ids, p = predict(
            model, dataset, tta, reduce, config.predict.beta, verbose=verbose
        )
        if other_ids.tolist() != ids.tolist():
            raise ValueError(f"{member}: predicted the records in another order")
        probs.append(p)
        del model
    return combine_folds(np.stack(probs), reduce)


def _labelled(files: Sequence[str]) -> bool:
    """True when our manifests say the records carry labels (not ``--test``)."""
    from shopee_tpu.data.records import read_manifest

    try:
        manifests = [read_manifest(f.rpartition("/")[0] or ".") for f in files]
    except FileNotFoundError:
        return False
    return all(m.get("test") is False and m.get("label_map") for m in manifests)


def _probs_path(out: str) -> str:
    stem = out[: -len(".csv")] if out.endswith(".csv") else out
    return f"{stem}.probs.npz"


def predict_run(
    run_dir: str | os.PathLike,
    data: str | Sequence[str],
    *,
    out: str | os.PathLike = "submission.csv",
    tta: Sequence[str] | None = None,
    reduce: str | None = None,
    batch_size: int | None = None,
    format: str = "shopee",
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
        format: ``shopee`` (``filename,category``, one row per image) or
            ``cdiscount`` (``_id,category_id``, images aggregated by product group).
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
        device: Overrides the config's device for ``connect()``.
        accelerator: An ``Accelerator`` to reuse instead of connecting.
        verbose: Print a summary.

    Returns:
        The submission as a DataFrame; ``df.attrs["summary"]`` counts images,
        products and MD5 hits.
    """
    from shopee_tpu.accelerator import connect
    from shopee_tpu.data import pipeline
    from shopee_tpu.experiments.kfold import fold_members
    from shopee_tpu.inference import md5 as md5_lib
    from shopee_tpu.inference.ensemble import aggregate_products, save_probs
    from shopee_tpu.inference.submission import (
        write_cdiscount_submission,
        write_shopee_submission,
    )
    from shopee_tpu.inference.tta import predict

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = os.fspath(out)
    saved = _read_json(_join(os.fspath(run_dir), "config.json"))
    members = fold_members(os.fspath(run_dir), saved) or [os.fspath(run_dir)]
    if accelerator is None:
        accelerator = connect(
            device or saved.get("device"),
            mixed_precision=bool(saved.get("mixed_precision", False)),
            verbose=verbose,
        )
    model, config, label_map, image_size = load_run_model(
        members[0], weights=weights, accelerator=accelerator
    )
    tta = tuple(tta or config.predict.tta)
    reduce = reduce or config.predict.reduce
    per_replica = batch_size or config.predict.batch_size or config.batch_size
    files = pipeline.list_files(data)
    if not files:
        raise FileNotFoundError(f"{data}: no TFRecord files")
    dataset = pipeline.load_dataset(
        files,
        schema=config.data.schema,
        image_size=image_size,
        batch_size=accelerator.batch_size(per_replica),
        training=False,
        num_classes=len(label_map),
    )
    ids, probs = predict(
        model, dataset, tta, reduce, config.predict.beta, verbose=verbose
    )
    if len(members) > 1:
        probs = _fold_ensemble(
            members,
            probs,
            ids,
            dataset,
            label_map,
            tta,
            reduce,
            weights,
            accelerator,
            verbose,
        )
    n_records = pipeline.count_records(files)
    if len(ids) != n_records or len(set(ids.tolist())) != len(ids):
        raise ValueError(
            f"{data}: predicted {len(ids)} rows ({len(set(ids.tolist()))} distinct ids) "
            f"for {n_records} records"
        )
    meta = {"run": os.fspath(run_dir), "tta": list(tta), "reduce": reduce}
    meta.update(
        label_map=label_map, **({"folds": len(members)} if len(members) > 1 else {})
    )
    save_probs(_probs_path(out), ids, probs, dtype="float16", meta=meta)

    summary = {"images": len(ids)}
    if _labelled(files):
        # Labelled records (a hold-out): score the probabilities, before any MD5
        # overrides, so runs and fold ensembles compare like with like.
        truth = pipeline.read_ids_labels(files, schema=config.data.schema)["label"]
        correct = probs.argmax(-1) == truth.to_numpy()
        summary["accuracy"] = round(float(correct.mean()), 4)
    needs_meta = md5_dict is not None or format == "cdiscount"
    info = (
        pipeline.read_ids_labels(files, schema=config.data.schema)
        if needs_meta
        else None
    )
    if info is not None and info["id"].astype(str).tolist() != ids.tolist():
        raise ValueError(
            f"{data}: read_ids_labels order differs from the dataset order"
        )
    if isinstance(md5_dict, str) and md5_dict == "auto":
        md5_dict = _declared_md5_dictionary(config.data.train)
        if md5_dict is not None and verbose:
            print(f"MD5 dictionary: {md5_dict} (declared by the training records)")
    dictionary = None
    if md5_dict is not None:
        dictionary = (
            md5_dict
            if isinstance(md5_dict, md5_lib.Md5Dictionary)
            else md5_lib.Md5Dictionary.load(md5_dict)
        )
        if (
            dictionary.label_map
            and {str(k): int(v) for k, v in dictionary.label_map.items()} != label_map
        ):
            raise ValueError("the MD5 dictionary was built with another label map")
        probs, summary["md5_images"] = md5_lib.apply_image_overrides(
            probs, info["md5"].tolist(), dictionary
        )
    if format == "shopee":
        df = write_shopee_submission(
            out, ids, probs, label_map, expected=ids if expected is None else expected
        )
    else:
        groups = [g or i for g, i in zip(info["group"].astype(str), ids, strict=True)]
        keys, product_probs = aggregate_products(groups, probs, product_reduce)
        if dictionary is not None:
            product_probs, summary["md5_products"] = md5_lib.apply_product_overrides(
                keys, product_probs, groups, info["md5"].tolist(), dictionary
            )
        products = _declared_products(files)
        if products is not None:
            keys, product_probs, summary["products_without_images"] = _all_products(
                products, keys, product_probs
            )
            expected = products if expected is None else expected
        summary["products"] = len(keys)
        df = write_cdiscount_submission(
            out, keys, product_probs, label_map, expected=expected
        )
    df.attrs["summary"] = summary
    if verbose:
        print(
            f"{out}: {len(df)} rows ({json.dumps(summary)}); probabilities in "
            f"{_probs_path(out)}"
        )
    return df


def _declared_md5_dictionary(train) -> str | None:
    """The MD5 dictionary named by the manifest of the training records, if any."""
    from shopee_tpu.data.files import list_files
    from shopee_tpu.data.manifests import read_manifest

    if not train:
        return None
    try:
        folder = os.path.dirname(list_files(train)[0])
        name = read_manifest(folder or ".").get("md5_dictionary")
    except (FileNotFoundError, ValueError):
        return None
    path = _join(folder, name) if name else None
    return path if path and not is_remote(path) and os.path.exists(path) else None


def _declared_products(files: Sequence[str]) -> list[str] | None:
    """Every product id of test records that list them (``products.csv``)."""
    from shopee_tpu.data.manifests import read_manifest

    folder = os.path.dirname(files[0]) or "."
    try:
        name = read_manifest(folder).get("products")
    except FileNotFoundError:
        return None
    if not name:
        return None
    path = _join(folder, name)
    if not _exists(path):
        raise FileNotFoundError(f"{path}: listed in {folder}/manifest.json but missing")
    return pd.read_csv(path, dtype={"_id": str})["_id"].tolist()


def _all_products(products: list[str], keys, product_probs):
    """Rows for every listed product, in the list's order. A product without a usable
    image gets the mean prediction of all products (the test set's likeliest class)."""
    import numpy as np

    row = {str(k): i for i, k in enumerate(np.asarray(keys).tolist())}
    listed = set(products)
    unknown = [k for k in row if k not in listed]
    if unknown:
        raise ValueError(
            f"test records hold products not in products.csv: {unknown[:5]}"
        )
    prior = np.asarray(product_probs).mean(axis=0, keepdims=True)
    table = np.concatenate([np.asarray(product_probs), prior])
    picks = [row.get(p, len(table) - 1) for p in products]
    n_missing = sum(p not in row for p in products)
    return np.asarray(products), table[picks], n_missing
