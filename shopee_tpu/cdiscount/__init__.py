"""The Cdiscount Image Classification competition: its BSON files to records.

=================== =========================================================
``prepare``         ``prepare_cdiscount``, ``prepare_cdiscount_test``: BSON to
                    records, split by product, deduplicated, MD5 dictionary
``bson_reader``     ``iter_products``: streaming the BSON files, with offsets
``plan``            the one-scan plan: class map, product split, duplicates
``shards``          writer processes that read products by file offset
``sample``          ``make_cdiscount_sample``: an offline competition folder
=================== =========================================================

Reading BSON needs the ``[cdiscount]`` extra (``pymongo``'s ``bson``).
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "prepare_cdiscount": "shopee_tpu.cdiscount.prepare",
    "prepare_cdiscount_test": "shopee_tpu.cdiscount.prepare",
    "iter_products": "shopee_tpu.cdiscount.bson_reader",
    "make_cdiscount_sample": "shopee_tpu.cdiscount.sample",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
