"""An exported model's folder (``shopee-tpu export``): its contract, and running it.

The folder holds the model, ``labels.txt`` (one class name a line, in output
order) and ``model.json``, the preprocessing contract a phone or server developer
reads: input size, NHWC RGB pixels in 0..255 as float32 (the model normalises
inside), output = softmax probabilities, the class names in order, and how the
export compared with the Keras model.

=================  ==================  ==========================================
format             file                quantize
=================  ==================  ==========================================
``litert``         ``model.tflite``    none (float32), ``float16`` (weights) or
                                       ``int8`` (calibrated on training images)
``onnx``           ``model.onnx``      none (float32)
``saved_model``    ``saved_model/``    none (float32)
=================  ==================  ==========================================

``load_exported`` runs a LiteRT model with ``ai-edge-litert`` and an ONNX model
with ``onnxruntime``; neither TensorFlow nor Keras is imported for them, so a
server or a test process stays light. A SavedModel needs TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from shopee_tpu import fs
from shopee_tpu.utils import require_extra, require_tensorflow

__all__ = [
    "FORMATS",
    "QUANTIZE",
    "CONTRACT",
    "LABELS",
    "check_format",
    "write_contract",
    "read_contract",
    "ExportedModel",
    "load_exported",
]

FORMATS = {"litert": "model.tflite", "onnx": "model.onnx", "saved_model": "saved_model"}
QUANTIZE = {"litert": ("float16", "int8"), "onnx": (), "saved_model": ()}
CONTRACT = "model.json"
LABELS = "labels.txt"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


def check_format(format: str, quantize: str | None) -> None:
    """Refuses a format, or a quantization the format does not take, in one line."""
    if format not in FORMATS:
        raise ValueError(
            f"export format must be one of {', '.join(FORMATS)}, got {format!r}"
        )
    if quantize is not None and quantize not in QUANTIZE[format]:
        takes = {f: q for f, q in QUANTIZE.items() if q}
        raise ValueError(
            f"--quantize {quantize} is not for {format}: "
            + "; ".join(f"{f} takes {' or '.join(q)}" for f, q in takes.items())
            + f"; {', '.join(f for f in FORMATS if f not in takes)} export float32"
        )


def write_contract(folder: str, **fields) -> dict:
    """Writes ``model.json`` and ``labels.txt`` into ``folder``; returns the contract.

    ``fields``: ``format``, ``quantize``, ``image_size``, ``classes`` and anything
    else worth keeping (the run, its TTA, the comparison with Keras).
    """
    size, classes = int(fields.pop("image_size")), list(fields.pop("classes"))
    format = fields.pop("format")
    contract = {
        "format": format,
        "file": FORMATS[format],
        "quantize": fields.pop("quantize", None),
        "input": {
            "name": INPUT_NAME,
            "shape": [None, size, size, 3],
            "layout": "NHWC",
            "channels": "RGB",
            "dtype": "float32",
            "value_range": [0, 255],
            "normalization": "inside the model: feed raw pixels",
            "resize": "the whole image squashed to a square, bicubic (Pillow), "
            "as shopee-tpu tfrecords --resize square writes it",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [None, len(classes)],
            "dtype": "float32",
            "kind": "probabilities (softmax; each row sums to 1)",
        },
        "image_size": size,
        "classes": classes,
        **fields,
    }
    fs.write_text(os.path.join(folder, LABELS), "".join(f"{c}\n" for c in classes))
    fs.write_json(os.path.join(folder, CONTRACT), contract)
    return contract


def _contract_path(path: str) -> str:
    folder = path if os.path.isdir(path) and not _is_saved_model(path) else None
    return os.path.join(folder or os.path.dirname(path) or ".", CONTRACT)


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def read_contract(path: str | os.PathLike) -> dict:
    """The contract of an export folder, or of a model file inside one."""
    found = _contract_path(os.fspath(path))
    if not os.path.isfile(found):
        raise FileNotFoundError(
            f"{path}: no {CONTRACT} beside it; export with shopee-tpu export "
            "(it writes the model, labels.txt and model.json together)"
        )
    return fs.read_json(found, what="the export's contract")


class ExportedModel:
    """An exported model ready to classify batches of 0..255 RGB images.

    Args:
        path: The export folder, or its ``model.tflite`` / ``model.onnx`` /
            ``saved_model``.
        threads: CPU threads of the runtime (default: the runtime's own).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        path = os.fspath(path)
        self.contract = read_contract(path)
        self.format = self.contract["format"]
        folder = os.path.dirname(_contract_path(path))
        self.path = os.path.join(folder, self.contract["file"])
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: named in {CONTRACT} but missing")
        self.image_size = int(self.contract["image_size"])
        self.classes = list(self.contract["classes"])
        self.threads = threads
        self._run = {
            "litert": self._litert,
            "onnx": self._onnx,
            "saved_model": self._saved_model,
        }[self.format]()

    def __repr__(self) -> str:
        q = self.contract.get("quantize") or "float32"
        return f"ExportedModel({self.path!r}, {self.format}, {q})"

    def _litert(self):
        require_extra("ai_edge_litert", "export", "running a LiteRT model")
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=self.path, num_threads=self.threads)
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        shape = {"batch": None}

        def run(x: np.ndarray) -> np.ndarray:
            if shape["batch"] != len(x):
                interpreter.resize_tensor_input(inp["index"], list(x.shape))
                interpreter.allocate_tensors()
                shape["batch"] = len(x)
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"]).copy()

        return run

    def _onnx(self):
        require_extra("onnxruntime", "export", "running an ONNX model")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            self.path, options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def _saved_model(self):
        tf = require_tensorflow()
        # Held by the model: the restored function needs the object's variables.
        self._saved = tf.saved_model.load(self.path)
        return lambda x: self._saved.serve(tf.constant(x)).numpy()

    def __call__(self, images) -> np.ndarray:
        """``[b, size, size, 3]`` pixels in 0..255 -> float32 ``[b, classes]``."""
        x = np.asarray(images, dtype=np.float32)
        want = (self.image_size, self.image_size, 3)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(
                f"{self.path} takes images [b, {want[0]}, {want[1]}, 3], got "
                f"{list(x.shape)}"
            )
        return np.asarray(self._run(np.ascontiguousarray(x)), dtype=np.float32)

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities of any number of images, ``batch_size`` at a time."""
        x = np.asarray(images)
        parts = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        if not parts:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(parts)


def load_exported(path: str | os.PathLike, *, threads: int | None = None):
    """An ``ExportedModel`` from an export folder or its model file."""
    return ExportedModel(path, threads=threads)
