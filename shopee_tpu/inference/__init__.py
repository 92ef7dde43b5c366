"""Prediction: batched TTA, product and model ensembles, stacking, the MD5 duplicate
dictionary, submissions and the TTA report.

- ``tta``: ``predict(model, dataset, tta, reduce, beta)`` (``shopee_tpu.predict``).
- ``ensemble``: means, ``aggregate_products``, ``ensemble`` of saved probability
  files, ``save_probs`` / ``load_probs`` (float16 or uint8 with ids).
- ``stacking``: ``fit_stacker`` on out-of-fold probabilities.
- ``md5``: ``build_md5_dictionary`` and the image / product overrides.
- ``submission``: Shopee and Cdiscount writers and validators.
- ``report``: ``tta_report`` on validation data.
- ``run``: ``predict_run`` (what ``shopee-tpu predict`` calls).

Submodules are imported on first use, so importing this package is cheap.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "predict": "tta",
    "reduce_views": "views",
    "ViewPlan": "views",
    "aggregate_products": "ensemble",
    "combine_models": "ensemble",
    "save_probs": "ensemble",
    "load_probs": "ensemble",
    "arithmetic_mean": "ensemble",
    "geometric_mean": "ensemble",
    "power_mean": "ensemble",
    "fit_stacker": "stacking",
    "concat_folds": "stacking",
    "build_md5_dictionary": "md5",
    "Md5Dictionary": "md5",
    "apply_image_overrides": "md5",
    "apply_product_overrides": "md5",
    "write_shopee_submission": "submission",
    "write_cdiscount_submission": "submission",
    "validate_shopee_submission": "submission",
    "validate_cdiscount_submission": "submission",
    "SubmissionError": "submission",
    "tta_report": "report",
    "predict_run": "run",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(
    __name__, {k: f"{__name__}.{v}" for k, v in _EXPORTS.items()}
)
