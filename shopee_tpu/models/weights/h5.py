"""Reading weight files into our models: two h5 layouts, and what a file holds.

* **Legacy ``.h5``** (Keras 2 and tf.keras ``save_weights``/``save``, what
  keras.applications and the 2020 ``efficientnet`` package publish): layers are
  matched **by name**. The ``efficientnet`` package's files have no ``rescaling`` /
  ``normalization`` layers (its models expect ``preprocess_input`` outside) and call
  the classifier ``probs``; both are accepted.
* **Keras 3 ``.weights.h5``** (``model.save_weights``, our run folders): layers are
  stored by class and order (``conv2d_3``), so they are matched by walking the model
  the way Keras saved it. Models holding composite layers (KerasHub backbones) go
  through Keras' own loader instead, with the classifier skipped when it differs.

Only the head (classifier, ConvNeXt's head LayerNorm) and the input normalisation
may be missing from a file; any other missing or misshapen layer is a
``WeightsError`` whose one-line message names the file and what differs. For
EfficientNets that is the variant on each side ("the file holds EfficientNet-B3
weights, the model is EfficientNet-B0").
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from shopee_tpu.models import layers as common
from shopee_tpu.models.efficientnet_scaling import (
    B0_STAGES,
    STEM_FILTERS,
    TOP_FILTERS,
    round_filters,
    round_repeats,
    scaling,
)
from shopee_tpu.models.weights.errors import WeightsError

NORMALIZATION_NAME = "normalization"  # the input normalisation our models own
CLASSIFIER_ALIASES = ("probs",)  # the efficientnet package's classifier


# ---------------------------------------------------------------------------
# What a file holds: EfficientNet signatures and architecture fingerprints.


class EffNetSignature(NamedTuple):
    """What tells EfficientNet variants apart: stem width, block count, features."""

    stem: int
    blocks: int
    top: int

    def label(self) -> str:
        for n in range(8):
            if self == _official_signature(n):
                return f"EfficientNet-B{n}"
        return (
            f"an EfficientNet with a {self.stem}-filter stem, {self.blocks} blocks "
            f"and {self.top} features"
        )


def _official_signature(n: int) -> EffNetSignature:
    sc = scaling(n)
    blocks = sum(round_repeats(stage[1], sc.depth) for stage in B0_STAGES)
    return EffNetSignature(
        round_filters(STEM_FILTERS, sc.width),
        blocks,
        round_filters(TOP_FILTERS, sc.width),
    )


def model_signature(model) -> EffNetSignature | None:
    """The EfficientNet signature of a model from our builder (None otherwise)."""
    names = [layer.name for layer in model.layers]
    if "stem_conv" not in names or "top_conv" not in names:
        return None
    blocks = {m[1] for n in names if (m := re.match(r"(block\d+[a-z]+)_dwconv$", n))}
    return EffNetSignature(
        int(model.get_layer("stem_conv").filters),
        len(blocks),
        int(model.get_layer("top_conv").filters),
    )


def legacy_signature(stores: dict) -> EffNetSignature | None:
    """The EfficientNet signature of a legacy file (layers by name)."""
    if "stem_conv" not in stores or "top_conv" not in stores:
        return None
    blocks = {m[1] for n in stores if (m := re.match(r"(block\d+[a-z]+)_dwconv$", n))}
    return EffNetSignature(
        int(stores["stem_conv"][0].shape[-1]),
        len(blocks),
        int(stores["top_conv"][0].shape[-1]),
    )


def structure_signature(group) -> EffNetSignature | None:
    """The EfficientNet signature of a Keras 3 file (layers by class and order).

    Our models and keras.applications' store the stem as the first ``conv2d`` and
    ``top_conv`` as the last; every MBConv block holds one depthwise conv and at
    least three 1x1 convs (SE reduce and expand, projection), which sets them apart
    from other depthwise networks.
    """
    convs = sorted(_indexed(group, "conv2d"))
    depthwise = _indexed(group, "depthwise_conv2d")
    if not convs or not depthwise or len(convs) < 2 + 3 * len(depthwise):
        return None

    def filters(index):
        key = "conv2d" if index == 0 else f"conv2d_{index}"
        return int(group[key]["vars"]["0"].shape[-1])

    return EffNetSignature(filters(convs[0]), len(depthwise), filters(convs[-1]))


def _indexed(group, stem: str) -> list[int]:
    out = []
    for key in group:
        if key == stem:
            out.append(0)
        elif (m := re.fullmatch(rf"{stem}_(\d+)", key)) and "vars" in group[key]:
            out.append(int(m[1]))
    return out


_FINGERPRINTS = (  # a layer name only that architecture's files hold
    ("conv2_block1_preact_bn", "ResNet v2"),
    ("conv2_block1_1_conv", "ResNet"),
    ("conv1/conv", "DenseNet"),
    ("block2_sepconv1", "Xception"),
    ("expanded_conv_depthwise", "MobileNetV2"),
    ("conv_dw_1", "MobileNet"),
    ("stem_conv", "EfficientNet"),
)


def guess_architecture(names) -> str | None:
    """A readable guess of what a legacy file holds, from its layer names."""
    names = list(names)
    for marker, label in _FINGERPRINTS:
        if marker in names:
            return label
    if any("convnext" in n for n in names):
        return "ConvNeXt"
    return None


def check_variant(model, file_sig: EffNetSignature | None, path: str) -> None:
    """Raises when an EfficientNet file holds another variant than the model."""
    model_sig = model_signature(model)
    if model_sig is None or file_sig is None or model_sig == file_sig:
        return
    hint = ""
    if (label := file_sig.label()).startswith("EfficientNet-B"):
        hint = f"; set model.backbone=efficientnet-b{label[-1]}"
    raise WeightsError(
        f"{path}: the file holds {label} weights, the model {model.name!r} is "
        f"{model_sig.label()}{hint}"
    )


# ---------------------------------------------------------------------------
# Shared helpers.


def is_classifier_name(name: str) -> bool:
    return (
        name == common.CLASSIFIER_NAME
        or name in CLASSIFIER_ALIASES
        or name.endswith("_head_dense")
    )


def _is_optional(name: str) -> bool:
    """Layers a file may lack: the head keeps its init, the input normalisation
    is then set from the weights' preprocessing."""
    return (
        is_classifier_name(name)
        or name.endswith(common.HEAD_SUFFIXES)
        or name == NORMALIZATION_NAME
    )


def _targets(layer) -> list:
    """A layer's variables in the order files store them (trainable, then not)."""
    if hasattr(layer, "layers"):  # a nested model: legacy files store it as one
        return list(layer.trainable_weights) + list(layer.non_trainable_weights)
    store: dict = {}
    layer.save_own_variables(store)
    return [store[str(i)] for i in range(len(store))]


def _classes(shapes) -> int | None:
    return int(shapes[0][-1]) if shapes and len(shapes[0]) == 2 else None


def _assign(layer, arrays: list[np.ndarray], path: str, report: dict) -> bool:
    """Assigns ``arrays`` to ``layer``; False if only the classifier mismatches."""
    targets = _targets(layer)
    shapes_file = [tuple(a.shape) for a in arrays]
    shapes_model = [tuple(v.shape) for v in targets]
    if shapes_file != shapes_model:
        if is_classifier_name(layer.name):
            report["head"] = (_classes(shapes_file), _classes(shapes_model))
            return False
        raise WeightsError(
            f"{path}: layer {layer.name!r} has weight shapes {shapes_file} in the "
            f"file but {shapes_model} in the model; the file is for another "
            "architecture, variant or number of input channels"
        )
    if hasattr(layer, "layers"):
        for v, a in zip(targets, arrays):
            v.assign(a)
    else:
        layer.load_own_variables({str(i): a for i, a in enumerate(arrays)})
    return True


def _absent(layer, report: dict) -> None:
    """Books a model layer the file does not hold: optional ones keep their init."""
    if not _is_optional(layer.name):
        report["missing"].append(layer.name)
        return
    report["skipped"].append(layer.name)
    if is_classifier_name(layer.name):
        report["head"] = (None, _classes([tuple(_targets(layer)[0].shape)]))


def new_report() -> dict:
    # head: (file classes or None, model classes) when the classifier was skipped.
    return {
        "loaded": 0,
        "skipped": [],
        "missing": [],
        "head": None,
        "normalization": False,
    }


def _missing_error(path: str, missing: list[str], file_names, model) -> WeightsError:
    what = guess_architecture(file_names)
    holds = f"{what} weights" if what else f"layers {list(file_names)[:3]}"
    return WeightsError(
        f"{path}: the file holds {holds}, the model is {model.name!r}: "
        f"{len(missing)} of its layers are not in the file, e.g. {missing[:3]}"
    )


# ---------------------------------------------------------------------------
# Legacy files: by layer name.


def legacy_stores(root) -> dict[str, list[np.ndarray]]:
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


def _stem(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def assign_by_name(model, stores: dict, path: str) -> dict:
    """Loads a legacy file's layers into ``model`` by name (see the module doc)."""
    check_variant(model, legacy_signature(stores), path)
    # Auto-named layers get a session suffix (normalization_1); match on the stem
    # when it is unambiguous.
    stems: dict[str, list[str]] = {}
    for name in stores:
        stems.setdefault(_stem(name), []).append(name)
    report = new_report()

    def visit(container):
        for layer in container.layers:
            if not layer.weights:
                continue
            name = layer.name
            key = name if name in stores else None
            if key is None and len(stems.get(_stem(name), [])) == 1:
                key = stems[_stem(name)][0]
            if key is None and is_classifier_name(name):
                key = next((k for k in stores if is_classifier_name(k)), None)
            if key is None and name.endswith(common.HEAD_SUFFIXES):
                # keras' notop ConvNeXt files hold it as an unnamed LayerNorm.
                norms = stems.get("layer_normalization", [])
                key = norms[0] if len(norms) == 1 else None
            if key is None:
                if hasattr(layer, "layers"):
                    visit(layer)  # the file may hold the nested layers by name
                else:
                    _absent(layer, report)
            elif _assign(layer, stores[key], path, report):
                report["loaded"] += 1
                report["normalization"] |= name == NORMALIZATION_NAME
            else:
                report["skipped"].append(name)

    visit(model)
    if report["missing"]:
        raise _missing_error(path, report["missing"], stores, model)
    return report


# ---------------------------------------------------------------------------
# Keras 3 files: by class and order.


def _snake(name: str) -> str:
    """Keras' ``to_snake_case`` (the .weights.h5 key of a layer class)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def structure_keys(model) -> dict[str, str]:
    """Layer name -> its key in a Keras 3 file's ``layers`` group."""
    out, counts = {}, {}
    for layer in model.layers:
        key = _snake(type(layer).__name__)
        counts[key] = counts.get(key, -1) + 1
        out[layer.name] = f"{key}_{counts[key]}" if counts[key] else key
    return out


def assign_by_structure(model, group, path: str, report: dict | None = None) -> dict:
    """Loads a Keras 3 file's ``layers`` group into ``model`` (see the module doc)."""
    top = report is None
    if top:
        check_variant(model, structure_signature(group), path)
        report = new_report()
    keys = structure_keys(model)
    for layer in model.layers:
        if not layer.weights:
            continue
        node = group.get(keys[layer.name])
        if hasattr(layer, "layers"):
            if node is None or "layers" not in node:
                report["missing"].append(layer.name)
            else:
                assign_by_structure(layer, node["layers"], path, report)
            continue
        if node is None or "vars" not in node:
            _absent(layer, report)
            continue
        arrays = [np.asarray(node["vars"][str(i)]) for i in range(len(node["vars"]))]
        if _assign(layer, arrays, path, report):
            report["loaded"] += 1
            report["normalization"] |= layer.name == NORMALIZATION_NAME
        else:
            report["skipped"].append(layer.name)
    if top and report["missing"]:
        raise _missing_error(path, report["missing"], list(group), model)
    return report


def has_composite_layers(model) -> bool:
    """True when some layer keeps weights in sub-layers that are not a nested model
    (KerasHub blocks): only Keras' own loader walks those."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            if has_composite_layers(layer):
                return True
        elif layer.weights and len(_targets(layer)) < len(layer.weights):
            return True
    return False


def assign_with_keras(model, group, path: str) -> dict:
    """Keras' loader for models with composite layers; a classifier that does not
    fit is skipped (kept fresh), anything else that differs is a WeightsError."""
    report = new_report()
    skip = []
    keys = structure_keys(model)
    for layer in model.layers:
        if not is_classifier_name(layer.name) or not layer.weights:
            continue
        node = group.get(keys[layer.name])
        shapes_model = [tuple(v.shape) for v in _targets(layer)]
        shapes_file = (
            [tuple(node["vars"][str(i)].shape) for i in range(len(node["vars"]))]
            if node is not None and "vars" in node
            else []
        )
        if shapes_file != shapes_model:
            skip.append(layer)
            report["skipped"].append(layer.name)
            report["head"] = (_classes(shapes_file), _classes(shapes_model))
    try:
        model.load_weights(path, objects_to_skip=skip or None)
    except Exception as e:  # Keras raises ValueError with a multi-line report
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: the file does not fit the model {model.name!r} ({first})"
        ) from e
    report["loaded"] = sum(1 for layer in model.layers if layer.weights) - len(skip)
    report["normalization"] = (
        NORMALIZATION_NAME in keys and keys[NORMALIZATION_NAME] in group
    )
    return report
