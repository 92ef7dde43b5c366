"""Kaggle kernels: build a push-ready folder that carries the package, push it with
the real ``kaggle`` client, and read its status.

=========== ==============================================================
``metadata`` ``kernel-metadata.json``: template, ``--set`` overrides, validation
``build``    ``build_kernel``: the notebook with the package embedded + metadata
``client``   ``push_kernel``, ``kernel_status``, ``parse_status`` (kaggle, lazily)
=========== ==============================================================

Nothing here imports ``kaggle`` until a push or a status call needs it, so
``import shopee_tpu`` works without credentials (``import kaggle`` authenticates
at import time).
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "build_kernel": "shopee_tpu.kernels.build",
    "embed_package": "shopee_tpu.kernels.build",
    "package_archive": "shopee_tpu.kernels.build",
    "push_kernel": "shopee_tpu.kernels.client",
    "kernel_status": "shopee_tpu.kernels.client",
    "parse_status": "shopee_tpu.kernels.client",
    "KaggleClientError": "shopee_tpu.kernels.client",
    "KernelError": "shopee_tpu.kernels.metadata",
    "KernelMetadataError": "shopee_tpu.kernels.metadata",
    "validate_metadata": "shopee_tpu.kernels.metadata",
    "slugify": "shopee_tpu.kernels.metadata",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
