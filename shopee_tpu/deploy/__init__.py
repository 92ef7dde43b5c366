"""Taking a trained model out: ``export`` writes a run's model as LiteRT
(``.tflite``, optionally float16 or int8), ONNX or a SavedModel, with its class
names and preprocessing contract, checked against the Keras model.

- ``writer``: ``export`` (what ``shopee-tpu export`` calls).
- ``convert``: a Keras model -> each format and quantization.
- ``check``: calibration and check images from records; ``compare_predictions``.

Reading an export back, with no TensorFlow or Keras for LiteRT and ONNX, is
``shopee_tpu.inference.exported``.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "export": "shopee_tpu.deploy.writer",
    "ExportResult": "shopee_tpu.deploy.writer",
    "compare_predictions": "shopee_tpu.deploy.check",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
