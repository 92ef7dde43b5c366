"""Prediction: batched TTA, product and model ensembles, stacking, the MD5 duplicate
dictionary, submissions and the TTA report.

- ``tta``: ``predict(model, dataset, tta, reduce, beta)`` (``shopee_tpu.predict``).
- ``ensemble``: means, ``aggregate_products``, ``ensemble`` of saved probability
  files, ``save_probs`` / ``load_probs`` (float16 or uint8 with ids).
- ``stacking``: ``fit_stacker`` on out-of-fold probabilities.
- ``md5``: ``build_md5_dictionary`` and the image / product overrides.
- ``submission``: the table of formats (Shopee, named classes, Cdiscount), their
  writers and validators.
- ``report``: ``tta_report`` on validation data.
- ``run``: ``predict_run`` (what ``shopee-tpu predict --data`` calls).
- ``files``: ``Classifier`` and ``predict_files``: plain image files, with a run
  or an exported model (``shopee-tpu predict --images``).
- ``exported``: an export folder's contract; ``load_exported`` runs it.

Submodules are imported on first use, so importing this package is cheap.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "predict": "shopee_tpu.inference.tta",
    "reduce_views": "shopee_tpu.inference.tta_views",
    "ViewPlan": "shopee_tpu.inference.tta_views",
    "aggregate_products": "shopee_tpu.inference.ensemble",
    "combine_models": "shopee_tpu.inference.ensemble",
    "save_probs": "shopee_tpu.inference.ensemble",
    "load_probs": "shopee_tpu.inference.ensemble",
    "arithmetic_mean": "shopee_tpu.inference.ensemble",
    "geometric_mean": "shopee_tpu.inference.ensemble",
    "power_mean": "shopee_tpu.inference.ensemble",
    "fit_stacker": "shopee_tpu.inference.stacking",
    "concat_folds": "shopee_tpu.inference.stacking",
    "build_md5_dictionary": "shopee_tpu.inference.md5",
    "Md5Dictionary": "shopee_tpu.inference.md5",
    "apply_image_overrides": "shopee_tpu.inference.md5",
    "apply_product_overrides": "shopee_tpu.inference.md5",
    "write_shopee_submission": "shopee_tpu.inference.submission",
    "write_named_submission": "shopee_tpu.inference.submission",
    "write_image_submission": "shopee_tpu.inference.submission",
    "write_cdiscount_submission": "shopee_tpu.inference.submission",
    "validate_shopee_submission": "shopee_tpu.inference.submission",
    "validate_named_submission": "shopee_tpu.inference.submission",
    "validate_cdiscount_submission": "shopee_tpu.inference.submission",
    "SubmissionError": "shopee_tpu.inference.submission",
    "tta_report": "shopee_tpu.inference.report",
    "predict_run": "shopee_tpu.inference.run",
    "Classifier": "shopee_tpu.inference.files",
    "predict_files": "shopee_tpu.inference.files",
    "load_exported": "shopee_tpu.inference.exported",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
