"""Loading weights into our models: every file a Kaggle user has, one error table.

``load_weights(model, source)`` (what ``weights=`` / ``model.weights`` use) accepts:

=====================================  ==========================================
source                                 input normalisation with ``"auto"``
=====================================  ==========================================
keras.applications files               the file's own (its ImageNet variance quirk
(``efficientnetb0_notop.h5``, ...)     is fixed on load)
the 2020 ``efficientnet`` package's    its record's (``records``): matched by the
files (imagenet autoaugment,           file's hash, the AdvProp conversions by
noisy-student, advprop; B0..B7)        their published names
PyTorch state dicts (``.pth``, ``.pt``,  its record's: the Lite wheels', timm's and
``.bin``) and ``.safetensors`` in the    efficientnet_pytorch's AdvProp files are
``efficientnet_pytorch`` or timm         known by hash
``tf_efficientnet`` naming (B0..B7,
Lite0..4)
a file no record knows                 the backbone's ImageNet record's (ImageNet
                                       mean/std; ``(x - 127) / 128`` for Lite)
a run folder of ours                   the run's own (its ``best.weights.h5``, else
                                       ``last.weights.h5``)
any ``model.save_weights`` file        the file's own
=====================================  ==========================================

``preprocessing="imagenet"``, ``"advprop"``, ``"lite"`` or a record's name
(``efficientnet-b3.advprop``) overrides the record. A classifier that
does not fit (a "notop" file, 1000 ImageNet classes, another run's class count)
keeps its fresh initialisation and the backbone loads. Everything else that differs
is a ``WeightsError`` (a ``ValueError``) whose one-line message names the file and
what differs: another architecture, another EfficientNet variant, the class count
when ``head="strict"``; a missing file or a folder without weights is a
``WeightsNotFoundError`` (also a ``FileNotFoundError``); a failed download is a
``WeightsUnavailableError``. The CLI prints all three as one line.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from shopee_tpu.models import layers as common
from shopee_tpu.models.weights import h5, pytorch, records, torch_files
from shopee_tpu.models.weights.errors import WeightsError, WeightsNotFoundError
from shopee_tpu.run_folder import RunFolder

RUN_WEIGHTS = ("best.weights.h5", "last.weights.h5")


def check_preprocessing(mode: str) -> str:
    """Returns ``mode`` if it is ``auto``, a normalisation or a record's name."""
    if mode != "auto" and mode not in records.NORMALIZATIONS:
        if mode not in records.records():
            raise ValueError(
                f"weights_preprocessing={mode!r}: expected auto, "
                f"{', '.join(records.NORMALIZATIONS)} or a weights record's name "
                "(efficientnet-b3.advprop)"
            )
    return mode


def normalization_of(mode: str) -> tuple[str, tuple, tuple]:
    """``(name, mean, std)`` that ``mode`` (a normalisation or a record) sets."""
    if mode in records.NORMALIZATIONS:
        return (mode, *records.NORMALIZATIONS[mode])
    record = records.records()[mode]
    return record.normalization, record.mean, record.std


def set_preprocessing(model, mode: str) -> None:
    """Sets the model's input normalisation to what ``mode`` weights expect.

    Raises:
        ValueError: ``mode`` is unknown, or the model's normalisation is fixed
            (keras.applications families carry their own).
    """
    check_preprocessing(mode)
    if mode == "auto":
        return
    try:
        layer = model.get_layer(h5.NORMALIZATION_NAME)
    except ValueError:
        layer = None
    values = layer.get_weights() if layer is not None else []
    if len(values) != 3:
        raise ValueError(
            f"weights_preprocessing={mode!r}: {model.name!r} has a fixed input "
            "normalisation; leave it at 'auto'"
        )
    _, mean, std = normalization_of(mode)
    layer.set_weights(
        [np.asarray(mean, "float32"), np.square(np.asarray(std, "float32")), values[2]]
    )
    layer.finalize_state()  # Normalization caches mean/variance tensors


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: the file to read and, for a run folder, the run."""

    path: str
    run: str | None = None
    backbone: str | None = None  # the run's model.backbone


def resolve_source(source: str | os.PathLike) -> WeightsSource:
    """A weights file, or a run folder's ``best.weights.h5`` (else ``last``).

    Raises:
        WeightsNotFoundError: no such file, or a folder without weights.
        WeightsError: a KerasHub preset folder (it belongs in ``model.backbone``).
    """
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        folder = RunFolder(path, writable=False)
        if folder.exists(folder.BEST) or folder.exists(folder.LAST):
            saved = folder.saved_config()
            return WeightsSource(
                folder.weights("best"), path, saved.model.backbone if saved else None
            )
        if _is_kerashub_preset(path):
            raise WeightsError(
                f"{path}: a KerasHub preset folder; pass it as "
                f"model.backbone=kerashub:{path} (its weights come with it)"
            )
        raise WeightsNotFoundError(
            f"{path}: a folder without {' or '.join(RUN_WEIGHTS)}; pass a run "
            "folder from `shopee-tpu train`, a .h5 / .weights.h5 file or a .pth / "
            ".safetensors state dict"
        )
    if not os.path.exists(path):
        raise WeightsNotFoundError(
            f"{path}: no such weights file or run folder (on Kaggle, attach the "
            "dataset holding it and pass its /kaggle/input/... path)"
        )
    return WeightsSource(path)


def _is_kerashub_preset(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    module = str(config.get("module", "")) if isinstance(config, dict) else ""
    return module.startswith("keras_hub") or os.path.exists(
        os.path.join(folder, "metadata.json")
    )


def load_weights(
    model,
    source: str | os.PathLike,
    *,
    preprocessing: str = "auto",
    head: str = "fresh",
    backbone: str | None = None,
) -> dict:
    """Loads a weights file or a run folder into ``model`` (see the module doc).

    Args:
        model: A model from ``shopee_tpu.models``.
        source: A ``.h5`` / ``.weights.h5`` file, a PyTorch or safetensors state
            dict (our EfficientNets only), or a run folder.
        preprocessing: ``auto`` (the file's own, else its record's, see the
            table), ``imagenet``, ``advprop``, ``lite`` or a record's name: the
            input normalisation the weights were trained with.
        head: ``fresh``: a classifier that does not fit keeps its initialisation
            (with a warning); ``strict``: that is an error too.
        backbone: The model's registry name, whose ImageNet record gives the
            normalisation of a file no record knows; default ``model.name``.

    Returns:
        ``{"path", "run", "loaded", "skipped", "head", "preprocessing",
        "record"}``: ``head`` is ``(file classes or None, model classes)`` when
        the classifier was kept fresh; ``preprocessing`` is the normalisation set
        (``imagenet``, ``advprop``, ``lite``), or ``"file"``; ``record`` the name
        of the record it came from, if any.

    Raises:
        WeightsNotFoundError: no such file, or a folder without weights.
        WeightsError: the file is for another architecture or variant (or
            another class count with ``head="strict"``); the message names both.
    """
    check_preprocessing(preprocessing)
    if head not in ("fresh", "strict"):
        raise ValueError(f"head={head!r}: expected 'fresh' or 'strict'")
    src = resolve_source(source)
    path = src.path
    if torch_files.is_torch_file(path):
        report = pytorch.load_file(model, path)
    else:
        report = _load_h5_file(model, path, strict=head == "strict")
    fix_imagenet_normalization(model)
    if report["head"] is not None:
        _report_head(path, report["head"], strict=head == "strict")
    mode = preprocessing
    if mode == "auto" and not report["normalization"] and _owns_normalization(model):
        mode = _record_of(path, backbone or model.name)
    set_preprocessing(model, mode)
    return {
        "path": path,
        "run": src.run,
        "loaded": report["loaded"],
        "skipped": report["skipped"],
        "head": report["head"],
        "preprocessing": "file" if mode == "auto" else normalization_of(mode)[0],
        "record": mode if mode in records.records() else None,
    }


def _record_of(path: str, backbone: str) -> str:
    """The record whose normalisation a file without its own gets: its own (by
    hash), else the backbone's ImageNet record, else ImageNet mean/std."""
    record = records.lookup(path) or records.lookup("imagenet", backbone)
    return record.name if record else "imagenet"


def _load_h5_file(model, path: str, *, strict: bool) -> dict:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not an HDF5 weights file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return h5.assign_by_name(model, h5.legacy_stores(root), path)
        if "layers" not in f:
            raise WeightsError(f"{path}: not a Keras weights file (no layers found)")
        if strict or h5.has_composite_layers(model):
            return _load_keras_file(model, f["layers"], path)
        return h5.assign_by_structure(model, f["layers"], path)


def _load_keras_file(model, group, path: str) -> dict:
    """Keras' own loader first (exact, walks composite layers); when it refuses,
    our walk names what differs."""
    if h5.has_composite_layers(model):
        return h5.assign_with_keras(model, group, path)
    try:
        model.load_weights(path)
    except Exception:
        return h5.assign_by_structure(model, group, path)
    report = h5.new_report()
    report["loaded"] = sum(1 for layer in model.layers if layer.weights)
    report["normalization"] = True  # an exact load holds every layer
    return report


def _owns_normalization(model) -> bool:
    try:
        return len(model.get_layer(h5.NORMALIZATION_NAME).weights) == 3
    except ValueError:
        return False


def _report_head(path: str, head: tuple, *, strict: bool) -> None:
    file_classes, model_classes = head
    what = (
        "has no classifier"
        if file_classes is None
        else f"has a {file_classes}-class classifier"
    )
    if strict:
        raise WeightsError(
            f"{path}: the file {what}, the model has {model_classes} classes"
        )
    warnings.warn(
        f"{path}: the file {what}, the model has {model_classes} classes: the "
        "backbone loaded, the classifier 'predictions' starts fresh",
        stacklevel=3,
    )


def fix_imagenet_normalization(model) -> bool:
    """Undoes keras.applications' ImageNet-file quirk (tensorflow#49930).

    Its EfficientNet ``.h5`` files store the ImageNet *std* as the Normalization
    *variance*, and keras.applications compensates with an extra
    ``Rescaling(1/sqrt(std))`` only when ``weights="imagenet"``. Loading such a file
    by path would otherwise silently skip that fix. Setting variance = std**2 gives
    the same result with no extra layer. Returns True when a fix was applied.
    """
    try:
        layer = model.get_layer("normalization")
    except ValueError:
        return False
    values = layer.get_weights()
    if len(values) != 3 or np.shape(values[1]) != (3,):
        return False
    if np.allclose(values[1], common.IMAGENET_STDDEV_RGB, atol=1e-6):
        values[1] = np.square(values[1])
        layer.set_weights(values)
        layer.finalize_state()  # Normalization caches mean/variance tensors
        return True
    return False
