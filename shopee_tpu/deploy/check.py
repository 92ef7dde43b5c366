"""The images an export calibrates on and is checked on, and the comparison of an
exported model with the Keras model it came from.

- **Calibration** (``int8``): a few hundred images of the run's training records
  (``data.train`` in its config), taken evenly from every shard, so each class is
  there (our writer stratifies shards by class).
- **The check**: the exported model and the Keras model classify the same images:
  by default the run's validation records (``data.valid``, or the shards training
  held out, chosen again with the run's seed), else a sample of its training
  records. ``compare_predictions`` gives the largest probability difference, the
  top-1 agreement and, for labelled records, both accuracies and the drop.
"""

from __future__ import annotations

import numpy as np

from shopee_tpu.data.manifests import manifest_beside
from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.data.read.files import holdout_files, list_files
from shopee_tpu.data.read.pipeline import eval_dataset

__all__ = [
    "record_images",
    "training_files",
    "check_files",
    "compare_predictions",
    "keras_probabilities",
]


def training_files(config, override=None) -> list[str]:
    """The records ``override`` names, else the run's training records.

    Raises:
        FileNotFoundError: One line naming the records and how to point elsewhere.
    """
    where = override or config.data.train
    try:
        return list_files(where) if where else []
    except (FileNotFoundError, ValueError):
        pass
    raise FileNotFoundError(
        f"int8 calibrates on the run's training records ({where}), which are not "
        "found here: pass --calibration RECORDS (a few hundred training images)"
    )


def check_files(config, override=None) -> tuple[list[str], str]:
    """The records to compare the export with Keras on, and what they are."""
    if override:
        return list_files(override), str(override)
    if config.data.valid:
        return list_files(config.data.valid), "the run's validation records"
    if not config.data.train:
        return [], "none: the run names no records"
    try:
        files = list_files(config.data.train)
    except (FileNotFoundError, ValueError):
        return [], f"none: the run's records ({config.data.train}) are not here"
    if config.data.valid_fraction > 0 and len(files) > 1:
        _, valid = holdout_files(files, config.data.valid_fraction, config.seed)
        return valid, "the shards training held out for validation"
    return files, "the run's training records (it held none out)"


def record_images(
    files: list[str], image_size: int, limit: int, *, schema: str = "shopee_tpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to ``limit`` uint8 images from ``files``, taken evenly across them, in
    file order, with their labels (``None`` for unlabelled test records)."""
    per_file = -(-limit // max(len(files), 1))
    images, labels = [], []
    for path in files:
        info = read_ids_labels([path], schema=schema)
        taken = 0
        for batch, _ in eval_dataset(
            [path], schema=schema, image_size=image_size, batch_size=64
        ):
            batch = np.asarray(batch)[: per_file - taken]
            images.append(batch)
            taken += len(batch)
            if taken >= per_file:
                break
        labels.append(info["label"].to_numpy()[:taken])
    if not images:
        raise ValueError("no images to calibrate or check on")
    x = np.concatenate(images)[:limit]
    y = np.concatenate(labels)[:limit]
    labelled = manifest_beside(files[0]).get("test") is not True and (y >= 0).all()
    return x, (y.astype(np.int64) if labelled else None)


def keras_probabilities(model, images: np.ndarray, batch_size: int = 64):
    """The Keras model's probabilities of float32 0..255 ``images``, one view."""
    x = np.asarray(images, np.float32)
    parts = []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        # The short last batch padded: one traced shape, one trace.
        padded = np.resize(batch, (batch_size, *x.shape[1:]))
        parts.append(
            np.asarray(model.predict_on_batch(padded), np.float32)[: len(batch)]
        )
    return np.concatenate(parts)


def compare_predictions(
    reference: np.ndarray, exported: np.ndarray, labels: np.ndarray | None = None
) -> dict:
    """How ``exported`` probabilities compare with the Keras ``reference`` ones.

    Returns:
        ``images``, ``max_abs_diff``, ``top1_agreement`` and
        ``top1_disagreements``; with labels also ``keras_correct``,
        ``exported_correct``, both accuracies and ``accuracy_drop_points``
        (Keras's accuracy minus the export's, in percentage points).
    """
    reference, exported = np.asarray(reference), np.asarray(exported)
    if reference.shape != exported.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {exported.shape}")
    n = len(reference)
    ref_top, exp_top = reference.argmax(-1), exported.argmax(-1)
    agree = int((ref_top == exp_top).sum())
    out = {
        "images": n,
        "max_abs_diff": float(np.abs(reference - exported).max()),
        "top1_agreement": round(agree / n, 6),
        "top1_disagreements": n - agree,
    }
    if labels is not None:
        keras_correct = int((ref_top == labels).sum())
        exported_correct = int((exp_top == labels).sum())
        out.update(
            keras_correct=keras_correct,
            exported_correct=exported_correct,
            keras_accuracy=round(keras_correct / n, 6),
            exported_accuracy=round(exported_correct / n, 6),
            accuracy_drop_points=round(100 * (keras_correct - exported_correct) / n, 4),
        )
    return out
