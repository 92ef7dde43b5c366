"""A Keras model on the TensorFlow backend -> a LiteRT, ONNX or SavedModel file.

Every file takes ``images`` ``[batch, size, size, 3]`` float32 pixels in 0..255
and returns ``probabilities`` ``[batch, classes]``: our models normalise inside
and end in a softmax, so the export carries both.

- **SavedModel** and **LiteRT** use Keras's own ``model.export``. LiteRT keeps to
  the builtin ops (no TensorFlow "select" ops, which a phone's LiteRT lacks).
  ``float16`` stores the weights as float16; ``int8`` quantizes weights and
  activations, calibrated on a representative set of training images, with
  float32 input and output (int8 inside, a float fallback for any op without an
  int8 kernel).
- **ONNX** goes through tf2onnx from a frozen graph. Keras's ``export(format=
  "onnx")`` hands tf2onnx the traced function as it is, and tf2onnx then turns the
  constants the function captures (our ``Normalization`` layer's mean and
  variance) into extra graph inputs, so the file asks for them at run time;
  freezing them into the graph first gives a model with one input.
"""

from __future__ import annotations

import os

import numpy as np

from shopee_tpu.inference.exported import FORMATS, INPUT_NAME, OUTPUT_NAME
from shopee_tpu.utils import require_extra, require_tensorflow

__all__ = ["write_model", "ONNX_OPSET"]

ONNX_OPSET = 17


def write_model(
    model,
    folder: str,
    format: str,
    *,
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
) -> str:
    """Writes ``model`` into ``folder`` in ``format``; returns the file's path.

    Args:
        model: A Keras model (TensorFlow backend) from 0..255 pixels to
            probabilities.
        folder: Where the model file goes (it exists).
        format: ``litert``, ``onnx`` or ``saved_model``.
        quantize: ``None``, ``float16`` or ``int8`` (LiteRT only).
        calibration: uint8 or float images ``[n, size, size, 3]`` for ``int8``.
    """
    tf = require_tensorflow()
    size = int(model.input_shape[1])
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)
    path = os.path.join(folder, FORMATS[format])
    if format == "saved_model":
        model.export(path, format="tf_saved_model", input_signature=[spec], verbose=0)
    elif format == "onnx":
        _write_onnx(model, spec, path)
    else:
        options = _litert_options(tf, quantize, calibration)
        model.export(
            path, format="litert", input_signature=[spec], verbose=0, **options
        )
    return path


def _litert_options(tf, quantize: str | None, calibration) -> dict:
    """The TFLite converter settings for each quantization."""
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if quantize is None:
        return {"target_spec": {"supported_ops": [builtins]}}
    if quantize == "float16":
        return {
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "target_spec": {
                "supported_ops": [builtins],
                "supported_types": [tf.float16],
            },
        }
    if calibration is None or not len(calibration):
        raise ValueError("int8 quantization needs calibration images")
    images = np.asarray(calibration, np.float32)

    def representative():
        for i in range(len(images)):
            yield [images[i : i + 1]]

    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": representative,
        "target_spec": {
            "supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, builtins]
        },
    }


class _Frozen:
    """What tf2onnx's ``from_function`` asks of a ``tf.function``: its concrete
    function, here with every variable and captured constant frozen in."""

    def __init__(self, concrete):
        self.concrete = concrete

    def get_concrete_function(self, *args):
        return self.concrete


def _write_onnx(model, spec, path: str) -> None:
    require_extra("tf2onnx", "export", "ONNX export")
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    concrete = tf.function(lambda images: model(images, training=False))
    frozen = convert_variables_to_constants_v2(concrete.get_concrete_function(spec))
    proto, _ = tf2onnx.convert.from_function(
        _Frozen(frozen), input_signature=[spec], opset=ONNX_OPSET
    )
    _rename(proto.graph, proto.graph.input[0].name, INPUT_NAME)
    _rename(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def _rename(graph, old: str, new: str) -> None:
    """Renames one tensor of an ONNX graph everywhere it is named."""
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
