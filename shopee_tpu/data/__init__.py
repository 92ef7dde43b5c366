"""Input data: TFRecord writing and reading, augmentations, grouped splits.

=================== =========================================================
``sources``         the Shopee layout, CSVs/DataFrames, label maps
``records``         ``write_records``, ``write_records_from_csv``, ``read_manifest``
``pipeline``        ``load_dataset``, ``read_ids_labels`` (and the ``files`` helpers)
``schemas``         feature layouts: ours and the well-known Kaggle ones
``augment``         ``augment_batch``, ``augment_image``, ``mix_batch`` (any backend)
``splits``          ``group_split``, ``stratified_group_kfold``
``digits``          a real offline dataset in the Shopee layout
``cdiscount``       ``prepare_cdiscount``: Cdiscount's BSON files to records
                    (``bson_reader``, ``cdiscount_plan``, ``cdiscount_sample``)
=================== =========================================================

Names are imported lazily, so ``import shopee_tpu.data`` works without TensorFlow;
only the reading side (``load_dataset`` and friends) needs it, and the writer never
does.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "write_records": "shopee_tpu.data.records",
    "write_records_from_csv": "shopee_tpu.data.records",
    "read_manifest": "shopee_tpu.data.records",
    "load_dataset": "shopee_tpu.data.pipeline",
    "read_ids_labels": "shopee_tpu.data.pipeline",
    "decode_image": "shopee_tpu.data.pipeline",
    "list_files": "shopee_tpu.data.files",
    "count_records": "shopee_tpu.data.files",
    "holdout_files": "shopee_tpu.data.files",
    "Schema": "shopee_tpu.data.schemas",
    "SCHEMAS": "shopee_tpu.data.schemas",
    "get_schema": "shopee_tpu.data.schemas",
    "augment_image": "shopee_tpu.data.augment",
    "augment_batch": "shopee_tpu.data.augment",
    "mix_batch": "shopee_tpu.data.augment",
    "group_split": "shopee_tpu.data.splits",
    "stratified_group_kfold": "shopee_tpu.data.splits",
    "make_digits_dataset": "shopee_tpu.data.digits",
    "prepare_cdiscount": "shopee_tpu.data.cdiscount",
    "prepare_cdiscount_test": "shopee_tpu.data.cdiscount",
    "iter_products": "shopee_tpu.data.bson_reader",
    "make_cdiscount_sample": "shopee_tpu.data.cdiscount_sample",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
