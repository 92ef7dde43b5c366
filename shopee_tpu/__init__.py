"""shopee_tpu: product-image classification for Kaggle kernels on TPU, GPU or CPU.

A notebook reads top to bottom::

    import shopee_tpu as st
    cfg = st.RunConfig.preset("shopee-b0").override("data.train=/kaggle/input/my-recs")
    acc = st.connect()                      # TPU, GPUs or CPU
    result = st.train(cfg, accelerator=acc)  # checkpoints, resume, plots
    ids, probs = st.predict(result.model, test_ds)

The names below are imported lazily, so ``import shopee_tpu`` works (and is fast)
without TensorFlow installed, and before the Keras backend is chosen.
"""

from __future__ import annotations

from shopee_tpu import frameworks, presets  # noqa: F401  (registers the presets)
from shopee_tpu.console import quiet_native_logs
from shopee_tpu.utils import lazy_exports

__version__ = "0.1.0"

quiet_native_logs()  # TensorFlow's C++ INFO and WARNING lines (TF_CPP_MIN_LOG_LEVEL)
frameworks.watch()  # who imports Keras before connect() chooses its backend

_EXPORTS = {
    "connect": "shopee_tpu.accelerator",
    "Accelerator": "shopee_tpu.accelerator",
    "AcceleratorNotFound": "shopee_tpu.accelerator",
    "RunConfig": "shopee_tpu.config",
    "ConfigError": "shopee_tpu.config",
    "PRESETS": "shopee_tpu.config",
    "train": "shopee_tpu.training",
    "predict": "shopee_tpu.inference.tta",
    "export": "shopee_tpu.deploy.writer",
    "Classifier": "shopee_tpu.inference.files",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
