"""``export``: a training run folder -> a model for a phone, a server or a browser.

What ``shopee-tpu export --run RUN --format litert|onnx|saved_model [--quantize
float16|int8] --out DIR`` calls. It rebuilds the run's model from its folder
(``config.json``, ``label_map.json``, ``best.weights.h5``) on the TensorFlow
backend, writes the model (``shopee_tpu.deploy.convert``), then checks it: the
exported file, reloaded in its own runtime (LiteRT, onnxruntime, TensorFlow),
and the Keras model classify the same held-out images, and the comparison goes
into the contract (``model.json``, ``shopee_tpu.inference.exported``).

Keras exports from the TensorFlow backend only. A run trained on JAX (a TPU) is
exported all the same: its weights file does not depend on the backend, so the
model is rebuilt on TensorFlow; when this process already runs Keras on JAX,
the export runs in a TensorFlow child process (``python -m shopee_tpu export``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from shopee_tpu.data.write.sources import class_names
from shopee_tpu.deploy import check as checks
from shopee_tpu.deploy.convert import write_model
from shopee_tpu.inference.exported import (
    ExportedModel,
    check_format,
    read_contract,
    write_contract,
)

__all__ = ["export", "ExportResult"]

CALIBRATION_IMAGES = 300
CHECK_IMAGES = 1000


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the folder, the model file and the contract."""

    folder: str
    model: str
    contract: dict

    @property
    def check(self) -> dict:
        """The comparison with the Keras model (``compare_predictions``)."""
        return self.contract.get("check") or {}


def export(
    run: str | os.PathLike,
    format: str = "litert",
    *,
    out: str | os.PathLike,
    quantize: str | None = None,
    weights: str = "best",
    calibration=None,
    calibration_images: int = CALIBRATION_IMAGES,
    check=None,
    check_images: int = CHECK_IMAGES,
    verbose: bool = True,
) -> ExportResult:
    """Exports a trained run's model, checked against the Keras model.

    Args:
        run: The training run folder.
        format: ``litert`` (``model.tflite``), ``onnx`` (``model.onnx``) or
            ``saved_model``.
        out: The folder to write (replaced if it exists): the model,
            ``labels.txt`` and ``model.json``.
        quantize: LiteRT only: ``float16`` (float16 weights) or ``int8``
            (weights and activations, calibrated on training images).
        weights: ``best`` or ``last``.
        calibration: Records to calibrate ``int8`` on (default: the run's
            training records, ``data.train``).
        calibration_images: How many images calibrate ``int8``.
        check: Records to compare the export with Keras on (default: the run's
            validation records); ``False`` skips the comparison.
        check_images: At most this many images are compared.
        verbose: Print one summary line.

    Returns:
        An ``ExportResult``; ``result.check`` holds the comparison.
    """
    check_format(format, quantize)
    out = os.fspath(out)
    if not _on_tensorflow():
        counts = (calibration_images, check_images)
        result = _export_in_child(
            run, format, out, quantize, weights, calibration, check, counts
        )
        if verbose:
            print(_summary(result))
        return result
    model, config, label_map, size = _float32_model(run, weights)
    calibration_set = None
    if quantize == "int8":
        files = checks.training_files(config, calibration)
        calibration_set, _ = checks.record_images(
            files, size, calibration_images, schema=config.data.schema
        )
    fields = dict(
        format=format,
        quantize=quantize,
        image_size=size,
        classes=class_names(label_map),
        backbone=config.model.backbone,
        run=os.path.abspath(os.fspath(run)),
        weights=weights,
        tta=list(config.predict.tta),
        reduce=config.predict.reduce,
        beta=config.predict.beta,
        calibration_images=None if calibration_set is None else len(calibration_set),
    )
    path, contract = _write_folder(
        model, out, fields, calibration_set, config, check, check_images
    )
    result = ExportResult(out, path, contract)
    if verbose:
        print(_summary(result))
    return result


def _write_folder(model, out, fields, calibration_set, config, check, check_images):
    """Writes the model and its contract into a staging folder beside ``out``,
    checks it, then puts it at ``out``; returns the model's path and contract."""
    format, quantize, size = fields["format"], fields["quantize"], fields["image_size"]
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        path = write_model(
            model, staging, format, quantize=quantize, calibration=calibration_set
        )
        fields["bytes"] = _bytes(path)
        write_contract(staging, **fields)  # what the check reads the model by
        comparison = _check(model, staging, config, size, check, check_images)
        contract = write_contract(staging, **fields, check=comparison)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(out, os.path.basename(path)), contract


def _float32_model(run, weights: str):
    """The run's model in float32, whatever dtype policy the session has set
    (a run trained in bfloat16 exports in float32, which every runtime takes)."""
    import keras

    from shopee_tpu.inference.run import load_run_model  # Keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return load_run_model(run, weights=weights)
    finally:
        keras.config.set_dtype_policy(policy)


def _on_tensorflow() -> bool:
    import keras  # the user's backend choice stands; only its name is read

    return keras.backend.backend() == "tensorflow"


def _check(model, folder, config, size, check, limit) -> dict:
    """Compares the file in ``folder``, run in its own runtime, with ``model``."""
    if check is False:
        return {"skipped": "check=False"}
    files, source = checks.check_files(config, check)
    if not files:
        return {"skipped": source}
    images, labels = checks.record_images(files, size, limit, schema=config.data.schema)
    reference = checks.keras_probabilities(model, images)
    exported = ExportedModel(folder).predict(images)
    return {
        "source": source,
        **checks.compare_predictions(reference, exported, labels),
    }


def _replace(staging: str, out: str) -> None:
    """Puts the finished export at ``out``, replacing an earlier one."""
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(out) or ".")
        os.rename(out, os.path.join(old, "x"))
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def _export_in_child(run, format, out, quantize, weights, calibration, check, counts):
    """The same export in a child process on the TensorFlow backend."""
    cmd = [sys.executable, "-m", "shopee_tpu", "export", "--run", os.fspath(run)]
    cmd += ["--format", format, "--out", out, "--weights", weights]
    cmd += ["--calibration-images", str(counts[0]), "--check-images", str(counts[1])]
    if quantize:
        cmd += ["--quantize", quantize]
    if calibration:
        cmd += ["--calibration", os.fspath(calibration)]
    if check is False:
        cmd += ["--no-check"]
    elif check:
        cmd += ["--check", os.fspath(check)]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"export on the TensorFlow backend failed ({proc.returncode}):\n"
            + proc.stderr[-3000:]
        )
    contract = read_contract(out)
    return ExportResult(out, os.path.join(out, contract["file"]), contract)


def _summary(result: ExportResult) -> str:
    c, check = result.contract, result.check
    what = f"{c['format']} ({c.get('quantize') or 'float32'})"
    line = f"{result.model}: {what}, {c['image_size']} px, {len(c['classes'])} classes"
    if "images" in check:
        line += (
            f"; against Keras on {check['images']} images ({check['source']}): "
            f"max |diff| {check['max_abs_diff']:.2g}, same top-1 "
            f"{check['top1_agreement']:.2%}"
        )
        if "accuracy_drop_points" in check:
            line += (
                f", accuracy {check['keras_accuracy']:.4f} -> "
                f"{check['exported_accuracy']:.4f}"
            )
    elif check.get("skipped"):
        line += f"; not compared with Keras ({check['skipped']})"
    return line


def _bytes(path: str) -> int:
    """Bytes of a file, or of everything under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, names in os.walk(path)
        for f in names
    )
