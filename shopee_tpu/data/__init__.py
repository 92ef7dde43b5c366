"""Input data: TFRecord writing and reading, augmentations, grouped splits.

Three rooms and what they share: ``write`` (no TensorFlow) and ``read`` (``tf.data``)
never import each other, ``samples`` writes through ``write``, and the formats and
``splits`` at this level import none of them.

===================== ====================================================
``write.sources``     the Shopee layout, CSVs/DataFrames, label maps
``write.records``     ``write_records``, ``write_records_from_csv`` (with
                      ``shard_writer``, ``writer_pool``, ``images``)
``write.folders``     ``write_records_from_folders``: a folder per class
``write.arrays``      ``write_arrays`` (``keras.datasets``), ``write_idx_records``
``write.pixels_csv``  ``write_pixels_csv``: Kaggle's ``label,pixel1..pixelN``
``write.idx``         MNIST's idx files: ``read_idx``, ``read_idx_pair``
``read.files``        finding, counting and holding out shards
``read.decode``       one record: parse, decode; ``read_ids_labels``
``read.pipeline``     ``train_dataset``, ``eval_dataset``, ``load_dataset``
                      (with ``sharding``, ``shapes``)
``read.augment``      ``augment_batch``, ``augment_image``, ``mix_batch`` (any backend)
``samples.digits``    ``samples.photos``: real offline datasets in the Shopee layout
``tfrecord``          the record format, written without TensorFlow
``manifests``         ``manifest.json``: reading it, resuming a write from it
``schemas``           feature layouts: ours and the well-known Kaggle ones
``splits``            ``group_split``, ``stratified_group_kfold``
===================== ====================================================

The Cdiscount competition's BSON files have their own package,
``shopee_tpu.cdiscount``.

Names are imported lazily, so ``import shopee_tpu.data`` works without TensorFlow;
only the reading side (``load_dataset`` and friends) needs it, and the writer never
does.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "write_records": "shopee_tpu.data.write.records",
    "write_records_from_csv": "shopee_tpu.data.write.records",
    "write_records_from_folders": "shopee_tpu.data.write.folders",
    "write_pixels_csv": "shopee_tpu.data.write.pixels_csv",
    "write_arrays": "shopee_tpu.data.write.arrays",
    "write_idx_records": "shopee_tpu.data.write.arrays",
    "read_idx": "shopee_tpu.data.write.idx",
    "read_idx_pair": "shopee_tpu.data.write.idx",
    "read_manifest": "shopee_tpu.data.manifests",
    "load_dataset": "shopee_tpu.data.read.pipeline",
    "train_dataset": "shopee_tpu.data.read.pipeline",
    "eval_dataset": "shopee_tpu.data.read.pipeline",
    "read_ids_labels": "shopee_tpu.data.read.decode",
    "decode_image": "shopee_tpu.data.read.decode",
    "list_files": "shopee_tpu.data.read.files",
    "count_records": "shopee_tpu.data.read.files",
    "holdout_files": "shopee_tpu.data.read.files",
    "Schema": "shopee_tpu.data.schemas",
    "SCHEMAS": "shopee_tpu.data.schemas",
    "get_schema": "shopee_tpu.data.schemas",
    "augment_image": "shopee_tpu.data.read.augment",
    "augment_batch": "shopee_tpu.data.read.augment",
    "mix_batch": "shopee_tpu.data.read.augment",
    "group_split": "shopee_tpu.data.splits",
    "stratified_group_kfold": "shopee_tpu.data.splits",
    "make_digits_dataset": "shopee_tpu.data.samples.digits",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
