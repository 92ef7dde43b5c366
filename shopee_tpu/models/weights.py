"""Loading pretrained weights: keras.applications files, by layer name, offline-safe.

Two file formats are read with ``h5py`` directly, so a file whose classifier does not
fit (1000 ImageNet classes into a 10-class model, or a "notop" file into a model with
a top) still loads its backbone:

* legacy ``.h5`` (what keras.applications publishes, and ``model.save("x.h5")``):
  layers are matched **by name**;
* Keras 3 ``.weights.h5`` (``model.save_weights``): layers are stored by class and
  order (``conv2d_3``), so they are matched by walking the model the way Keras
  saved it; this holds for files from the same architecture (ours or
  keras.applications', whose layer order we mirror).

Only the head (classifier ``predictions`` / ConvNeXt ``*_head_dense``, and
ConvNeXt's head LayerNorm when absent) may be skipped;
any other missing or misshapen layer is an error naming the layer and the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings

import numpy as np

from shopee_tpu.models import layers as common

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


class WeightsUnavailableError(RuntimeError):
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


def load_weights(model, path: str | os.PathLike) -> dict:
    """Loads a ``.h5`` / ``.weights.h5`` file into ``model``, tolerating only a
    classifier that does not fit (it keeps its fresh initialisation).

    Returns:
        ``{"loaded": n_layers, "skipped": [layer names kept at init]}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a backbone layer is missing from the file or has another shape.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights file {path!r} not found (pass None, 'imagenet' or a path to "
            "a .h5 / .weights.h5 file)"
        )
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            stores = _legacy_stores(root)
            report = _assign_by_name(model, stores, path)
        elif "layers" in f:
            report = _assign_by_structure(model, f["layers"], path)
        else:
            raise ValueError(f"{path}: not a Keras weights file (no layers found)")
    fix_imagenet_normalization(model)
    if report["skipped"]:
        warnings.warn(
            f"{path}: kept the fresh initialisation of {report['skipped']} (the file's "
            "classifier is missing or has another number of classes)",
            stacklevel=2,
        )
    return report


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


def _legacy_stores(root) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays in saved order, from a legacy h5 group."""
    out = {}
    for raw in root.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        group = root[name]
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in group.attrs["weight_names"]
        ]
        if names:
            out[name] = [np.asarray(group[n]) for n in names]
    return out


def _is_classifier_name(name: str) -> bool:
    return name == common.CLASSIFIER_NAME or name.endswith("_head_dense")


def _is_optional(name: str) -> bool:
    """Head layers may be absent from a file (notop files) and keep their init."""
    return _is_classifier_name(name) or name.endswith(common.HEAD_SUFFIXES)


def _targets(layer) -> list:
    """A layer's variables in the order files store them (trainable, then not)."""
    if hasattr(layer, "layers"):  # a nested model: legacy files store it as one
        return list(layer.trainable_weights) + list(layer.non_trainable_weights)
    store: dict = {}
    layer.save_own_variables(store)
    return [store[str(i)] for i in range(len(store))]


def _assign(layer, arrays: list[np.ndarray], path: str) -> bool:
    """Assigns ``arrays`` to ``layer``; False if only the classifier mismatches."""
    targets = _targets(layer)
    shapes_file = [tuple(a.shape) for a in arrays]
    shapes_model = [tuple(v.shape) for v in targets]
    if shapes_file != shapes_model:
        if _is_classifier_name(layer.name):
            return False
        raise ValueError(
            f"{path}: layer {layer.name!r} has weight shapes {shapes_file} in the file "
            f"but {shapes_model} in the model; the file is for another architecture, "
            "variant or input channels"
        )
    if hasattr(layer, "layers"):
        for v, a in zip(targets, arrays):
            v.assign(a)
    else:
        layer.load_own_variables({str(i): a for i, a in enumerate(arrays)})
    return True


def _stem(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _assign_by_name(model, stores: dict, path: str) -> dict:
    # Auto-named layers get a session suffix (normalization_1); match on the stem
    # when it is unambiguous.
    stems: dict[str, list[str]] = {}
    for name in stores:
        stems.setdefault(_stem(name), []).append(name)
    report = {"loaded": 0, "skipped": [], "missing": []}

    def visit(container):
        for layer in container.layers:
            if not layer.weights:
                continue
            name = layer.name
            key = name if name in stores else None
            if key is None and len(stems.get(_stem(name), [])) == 1:
                key = stems[_stem(name)][0]
            if key is None and _is_classifier_name(name):
                key = next((k for k in stores if _is_classifier_name(k)), None)
            if key is None and name.endswith(common.HEAD_SUFFIXES):
                # keras' notop ConvNeXt files hold it as an unnamed LayerNorm.
                norms = stems.get("layer_normalization", [])
                key = norms[0] if len(norms) == 1 else None
            if key is None:
                if hasattr(layer, "layers"):
                    visit(layer)  # the file may hold the nested layers by name
                elif _is_optional(name):
                    report["skipped"].append(name)
                else:
                    report["missing"].append(name)
            elif _assign(layer, stores[key], path):
                report["loaded"] += 1
            else:
                report["skipped"].append(name)

    visit(model)
    missing = report.pop("missing")
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} layers of the model are not in the file, e.g. "
            f"{missing[:5]}; the file is for another architecture"
        )
    return report


def _snake(name: str) -> str:
    """Keras' ``to_snake_case`` (the .weights.h5 key of a layer class)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _assign_by_structure(model, group, path: str) -> dict:
    loaded, skipped, missing = 0, [], []
    counts: dict[str, int] = {}
    for layer in model.layers:
        key = _snake(type(layer).__name__)
        counts[key] = counts.get(key, -1) + 1
        key = f"{key}_{counts[key]}" if counts[key] else key
        if not layer.weights:
            continue
        node = group.get(key)
        if hasattr(layer, "layers"):
            if node is None or "layers" not in node:
                missing.append(layer.name)
                continue
            sub = _assign_by_structure(layer, node["layers"], path)
            loaded += sub["loaded"]
            skipped += sub["skipped"]
            continue
        if node is None or "vars" not in node:
            (skipped if _is_optional(layer.name) else missing).append(layer.name)
            continue
        arrays = [np.asarray(node["vars"][str(i)]) for i in range(len(node["vars"]))]
        if _assign(layer, arrays, path):
            loaded += 1
        else:
            skipped.append(layer.name)
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} layers of the model are not in the file, e.g. "
            f"{missing[:5]}; the file is for another architecture"
        )
    return {"loaded": loaded, "skipped": skipped}
