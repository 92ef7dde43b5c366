"""``shopee-tpu demo`` (``make demo``): the main job end to end on real bundled data.

1. scikit-learn's 1,797 real digit scans become a Shopee-layout competition folder
   (``train.csv``/``test.csv`` with ``filename,category``, two-digit categories,
   nested image folders, 1-4 images per product, a few exact duplicates);
2. ``shopee-tpu tfrecords`` writes train and test records;
3. ``shopee_tpu.train`` trains a small from-scratch EfficientNet on the CPU;
4. ``predict_run`` predicts the held-out test set with TTA, applies the MD5
   duplicate dictionary and writes a validated ``submission.csv``;
5. the submission is scored against the held-out truth into ``metrics.json``.

Every step is resumable: rerunning reuses the data, the records and the finished run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.accelerator import connect_for
from shopee_tpu.config import RunConfig
from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.read.pipeline import read_ids_labels
from shopee_tpu.data.samples.digits import make_digits_dataset
from shopee_tpu.data.write.records import write_records_from_csv
from shopee_tpu.data.write.sources import class_names
from shopee_tpu.inference.ensemble import aggregate_products, load_probs
from shopee_tpu.inference.md5 import build_from_records
from shopee_tpu.inference.run import predict_run
from shopee_tpu.training import train
from shopee_tpu.utils import require_extra

__all__ = ["prepare_demo_data", "run_demo", "score_submission"]


def prepare_demo_data(
    out: str | os.PathLike,
    *,
    image_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict:
    """Writes the digits competition folder and its train/test records under ``out``.

    Returns:
        Paths: ``train_records``, ``test_records``, ``test_csv``, ``test_labels_csv``,
        ``md5_dict`` and the digits summary.
    """
    out = os.fspath(out)
    raw = os.path.join(out, "data")
    summary_path = os.path.join(raw, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            info = json.load(f)
        if info.get("seed", seed) != seed:
            raise ValueError(
                f"{out} holds the demo data of seed {info['seed']}, not {seed}: "
                "pass another --out for this seed"
            )
    else:
        info = make_digits_dataset(raw, image_size=image_size, limit=limit, seed=seed)
        info["seed"] = seed
        fs.write_text(summary_path, json.dumps(info, indent=1))
    records = os.path.join(out, "records")
    options = dict(
        image_size=None,
        resize="square",
        quality=95,
        workers=workers,
        overwrite=False,
        seed=seed,
    )
    write_records_from_csv(
        info["train_csv"],
        info["train_images"],
        os.path.join(records, "train"),
        test=False,
        shards=8,
        label_map=None,
        **options,
    )
    write_records_from_csv(
        info["test_csv"],
        info["test_images"],
        os.path.join(records, "test"),
        test=True,
        shards=2,
        label_map=os.path.join(records, "train", "manifest.json"),
        **options,
    )
    md5_path = os.path.join(records, "train_md5.npz")
    if not os.path.exists(md5_path):
        build_from_records(os.path.join(records, "train")).save(md5_path)
    return {
        **info,
        "train_records": os.path.join(records, "train"),
        "test_records": os.path.join(records, "test"),
        "md5_dict": md5_path,
    }


def score_submission(
    submission: pd.DataFrame,
    truth_csv: str,
    probs_path: str | None = None,
    test_records: str | None = None,
) -> dict:
    """Accuracy of a Shopee submission against the held-out truth.

    With the probabilities file (written before the MD5 overrides) and the test
    records (which carry the label map and each image's product), also scores the
    model's own predictions (``test_accuracy_model``: the argmax of its TTA
    probabilities, no MD5 overrides) and product-level averaging
    (``test_accuracy_product_sum``: every image of a product gets the product's
    summed prediction).
    """
    truth = pd.read_csv(truth_csv, dtype=str)
    merged = truth.merge(submission.astype(str), on="filename", suffixes=("", "_pred"))
    if len(merged) != len(truth):
        raise ValueError(f"submission covers {len(merged)} of {len(truth)} test images")
    scores = {
        "test_images": len(truth),
        "test_accuracy": round(
            float((merged.category == merged.category_pred).mean()), 4
        ),
    }
    if probs_path and test_records:
        probs = load_probs(probs_path)
        names = np.array(class_names(read_manifest(test_records)["label_map"]))
        ids = np.asarray(probs.ids).astype(str)
        truth_cat = truth.set_index("filename").category.reindex(ids).to_numpy()
        own = names[probs.probs.argmax(-1)]
        scores["test_accuracy_model"] = round(float((own == truth_cat).mean()), 4)
        groups = read_ids_labels(test_records).set_index("id").group
        g = groups.reindex(ids).fillna("").to_numpy()
        g = np.where(g == "", ids, g)  # an image without a product is its own product
        keys, product_probs = aggregate_products(g, probs.probs, "sum")
        pred_of = dict(zip(keys, product_probs.argmax(-1), strict=True))
        by_image = names[[int(pred_of[k]) for k in g]]
        scores["test_accuracy_product_sum"] = round(
            float((by_image == truth_cat).mean()), 4
        )
    return scores


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    sets: Iterable[str] = (),
    seed: int | None = None,
    verbose: int = 1,
) -> dict:
    """Runs the demo and returns (and saves) ``out/metrics.json``.

    Args:
        out: Folder for data, records, the run and the submission.
        quick: 5 epochs (about a minute and a half on 2 cores) for smoke tests.
        sets: ``key=value`` overrides of the ``demo`` preset.
        seed: Seed of the products, the train/test split and the training
            (default: the preset's).
        verbose: 0 for quiet.

    Raises:
        ImportError: scikit-learn (the ``[demo]`` extra) is not installed.
        ValueError: ``out`` holds the demo of another seed.
    """
    require_extra("sklearn", "demo", "the demo's bundled data (scikit-learn's digits)")

    start = time.monotonic()
    out = os.fspath(out)
    cfg = RunConfig.preset("demo")
    if seed is not None:
        cfg = cfg.override(f"seed={int(seed)}")
    if quick:
        # 5 of the 22 epochs, and an EMA that forgets faster, so that it follows a
        # run of ~200 steps; the cosine runs its whole course in those 5 epochs
        # (the held-out accuracy on each seed: docs/benchmarks.md).
        cfg = cfg.override("epochs=5", "optim.ema_momentum=0.95")
    cfg = cfg.override(list(sets))
    # Before the records are read: tf.data would start Keras on TensorFlow, and on
    # a TPU VM only JAX reaches the TPU.
    acc = connect_for(cfg, verbose=verbose)
    data = prepare_demo_data(out, seed=cfg.seed)
    cfg = cfg.override(f"data.train={data['train_records']}", f"out_dir={out}/run")
    result = train(cfg, accelerator=acc, verbose=verbose)
    submission_path = os.path.join(out, "submission.csv")
    submission = predict_run(
        cfg.out_dir,
        data["test_records"],
        out=submission_path,
        md5_dict=data["md5_dict"],
        expected=data["test_csv"],
        accelerator=acc,
        verbose=bool(verbose),
    )
    scores = score_submission(
        submission,
        data["test_labels_csv"],
        probs_path=submission_path.removesuffix(".csv") + ".probs.npz",
        test_records=data["test_records"],
    )
    metrics = {
        **scores,
        "md5_overrides": submission.attrs.get("summary", {}).get("md5_images"),
        "best_val_accuracy": result.metrics.get("best_val_accuracy"),
        "train_images_per_sec": result.metrics.get("images_per_sec"),
        "epochs": result.metrics.get("epochs_completed"),
        "seed": cfg.seed,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "submission": submission_path,
        "wall_time_sec": round(time.monotonic() - start, 1),
    }
    fs.write_text(
        os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1) + "\n"
    )
    return metrics
