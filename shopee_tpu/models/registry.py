"""Backbone registry: one name -> one model with our head and our input contract.

Names (case-insensitive; ``-``/``_`` optional outside the EfficientNet ones):

* ``efficientnet-b0`` .. ``efficientnet-b7``, ``efficientnet-lite0`` ..
  ``efficientnet-lite4`` and ``efficientnet-phi<value>`` (``efficientnet-phi-3``,
  ``efficientnet-phi0.5``): our builder.
* keras.applications families for Cdiscount-style ensembles: ``resnet50/101/152``,
  ``resnet50v2/101v2/152v2``, ``densenet121/169/201``, ``xception``,
  ``efficientnetv2-b0/b1/b2/b3/s/m/l``, ``convnext-tiny/small/base``.
* ``kerashub:PATH_OR_NAME``: a KerasHub preset (a Kaggle Models folder) with its
  weights, normalised by its image converter (``shopee_tpu.models.kerashub``).
* ``tiny-cnn``: three convolutions, for smoke runs and tests
  (``shopee_tpu.models.tiny``).
* ``small-resnet`` (``-w<width>``, ``-b<blocks>``): a residual CNN for 28-64 px
  images on CPUs (``shopee_tpu.models.small_resnet``).

Every model takes float RGB pixels in 0..255. Where keras.applications expects its
``preprocess_input`` outside the model (ResNet v1 "caffe", ResNet v2 and Xception
"tf", DenseNet "torch"), an ``ImageNetPreprocess`` layer does it inside; EfficientNetV2
and ConvNeXt use their built-in preprocessing. Every model ends in the same head
(GAP, optional dropout, float32 softmax ``predictions``; ConvNeXt keeps its pooled
LayerNorm). Weights: ``None``, ``"imagenet"`` (EfficientNets: its weights record;
other families: keras.applications' notop file; offline either fails with a hint),
a local ``.h5`` / ``.weights.h5`` path loaded by layer name, or for our
EfficientNets a record's tag or name, or a PyTorch / safetensors state dict
(``shopee_tpu.models.weights``); a classifier that does not fit is skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import keras

from shopee_tpu.config import ModelConfig
from shopee_tpu.models import kerashub, small_resnet, tiny
from shopee_tpu.models import layers as common
from shopee_tpu.models.efficientnet_builder import efficientnet
from shopee_tpu.models.efficientnet_scaling import scaling
from shopee_tpu.models.weights import loader, records
from shopee_tpu.models.weights.errors import WeightsError, WeightsUnavailableError


@dataclass(frozen=True)
class Family:
    """A keras.applications backbone: constructor, native size, preprocessing."""

    name: str  # our canonical registry name
    constructor: str  # attribute of keras.applications
    size: int  # native input side
    mode: str | None  # ImageNetPreprocess mode, None when built in
    min_size: int = 32
    builtin_preprocessing: bool = False
    keras_name: str = ""  # keras.applications' model name (ConvNeXt head names)


def _families() -> dict[str, Family]:
    out = {}

    def add(fam: Family):
        out[re.sub(r"[-_ ]", "", fam.name)] = fam

    for depth in (50, 101, 152):
        add(Family(f"resnet{depth}", f"ResNet{depth}", 224, "caffe"))
        add(Family(f"resnet{depth}v2", f"ResNet{depth}V2", 224, "tf"))
    for depth in (121, 169, 201):
        add(Family(f"densenet{depth}", f"DenseNet{depth}", 224, "torch"))
    add(Family("xception", "Xception", 299, "tf", min_size=71))
    v2 = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "s": 384, "m": 480, "l": 480}
    for tag, size in v2.items():
        add(
            Family(
                f"efficientnetv2-{tag}",
                f"EfficientNetV2{tag.upper()}",
                size,
                None,
                builtin_preprocessing=True,
            )
        )
    for tag in ("tiny", "small", "base"):
        add(
            Family(
                f"convnext-{tag}",
                f"ConvNeXt{tag.capitalize()}",
                224,
                None,
                builtin_preprocessing=True,
                keras_name=f"convnext_{tag}",
            )
        )
    return out


FAMILIES = _families()
_EFFNET_B = re.compile(r"efficientnet[-_]?b(?P<n>[0-7])")
_EFFNET_LITE = re.compile(r"efficientnet[-_]?lite(?P<n>[0-4])")
_EFFNET_PHI = re.compile(r"efficientnet[-_]?phi(?P<v>[-+]?(\d+\.?\d*|\.\d+))")


class InputSpec(NamedTuple):
    """What a model wants as input: side in pixels and the value range."""

    size: int
    value_range: tuple[float, float]


def available_models() -> list[str]:
    """Every registry name (EfficientNet phi variants accept any value)."""
    names = [f"efficientnet-b{n}" for n in range(8)]
    names += [f"efficientnet-lite{n}" for n in range(5)] + ["efficientnet-phi<value>"]
    names += [f.name for f in FAMILIES.values()]
    small = f"{small_resnet.NAME}[-w<width>][-b<blocks>]"
    return names + [tiny.NAME, small, "kerashub:<preset>"]


def resolve(name: str):
    """Parses a registry name: ``("efficientnet", variant)``, ``("family", Family)``,
    ``("kerashub", preset)``, ``("small", (width, blocks))`` or ``("tiny", None)``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if (preset := kerashub.parse(name)) is not None:
        return "kerashub", preset
    text = str(name).strip().lower()
    if m := _EFFNET_B.fullmatch(text):
        return "efficientnet", int(m["n"])
    if m := _EFFNET_LITE.fullmatch(text):
        return "efficientnet", f"lite{m['n']}"
    if m := _EFFNET_PHI.fullmatch(text):
        return "efficientnet", float(m["v"])
    if (shape := small_resnet.parse(text)) is not None:
        return "small", shape
    key = re.sub(r"[-_ ]", "", text)
    if key == re.sub(r"[-_ ]", "", tiny.NAME):
        return "tiny", None
    if key in FAMILIES:
        return "family", FAMILIES[key]
    raise ValueError(
        f"unknown backbone {name!r}; known: {', '.join(available_models())}"
    )


def input_spec(name_or_model) -> InputSpec:
    """Input side and value range for a registry name or a built model.

    Every model here takes 0..255 pixels; the size is the native resolution for a
    name and the built input side for a model.
    """
    if isinstance(name_or_model, str):
        kind, what = resolve(name_or_model)
        if kind == "kerashub":
            size = kerashub.native_size(what)
        elif kind == "tiny":
            size = tiny.NATIVE_SIZE
        elif kind == "small":
            size = small_resnet.NATIVE_SIZE
        else:
            size = scaling(what).resolution if kind == "efficientnet" else what.size
        return InputSpec(int(size), common.VALUE_RANGE)
    shape = name_or_model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    if shape[1] is None:
        raise ValueError(f"model {name_or_model.name!r} has no fixed input size")
    return InputSpec(int(shape[1]), common.VALUE_RANGE)


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str | None = None,
    input_size: int | None = None,
    dropout: float = 0.0,
    drop_connect_rate: float = 0.2,
    activation: str = "auto",
    batchnorm_momentum: float = 0.99,
    include_top: bool = True,
    weights_preprocessing: str = "auto",
    pretrained: bool = True,
    any_size: bool = False,
) -> keras.Model:
    """Builds a registry backbone with our head (see the module docstring).

    Args:
        name: Registry name, e.g. ``efficientnet-b3``, ``efficientnet-phi-2.5``,
            ``resnet50v2``, ``convnext-tiny``.
        num_classes: Classifier outputs.
        weights: ``None``, ``"imagenet"`` (EfficientNets: or another record),
            a path to a ``.h5`` / ``.weights.h5`` (keras.applications', the
            ``efficientnet`` package's, ours) or a run folder (its
            ``best.weights.h5``). A KerasHub preset brings its own
            weights; ``weights`` then may only name a run or file to load on top.
        input_size: Square input side; ``None`` uses the native one.
        dropout: Dropout before the classifier.
        drop_connect_rate: EfficientNet stochastic depth; keras.applications
            families only accept the default 0.2 (their own setting is used).
        activation: EfficientNet, ``small-resnet`` and ``tiny-cnn`` activation;
            ``auto`` is the backbone's own (swish, ReLU6 for EfficientNet-Lite,
            ReLU for ``small-resnet``), the only value other families accept.
        batchnorm_momentum: Set on every BatchNormalization layer.
        include_top: ``False`` returns the pooled features.
        weights_preprocessing: EfficientNet and KerasHub only: the input
            normalisation the weights were trained with, ``auto`` (from the
            weights' record), ``imagenet``, ``advprop``, ``lite`` or a record's name
            (see ``shopee_tpu.models.weights.loader``).
        pretrained: ``False`` builds the architecture only: ``weights`` is ignored
            and a KerasHub preset's weights are not read (before loading a run's
            own weights).
        any_size: Our own builders (see ``supports_any_size``): leave the input
            side open, for one model trained at several sizes.

    Raises:
        ValueError: unknown name, or an option the family cannot honour.
        WeightsError: the weights do not fit (one line naming file and difference).
    """
    kind, what = resolve(name)
    if not pretrained:
        weights = None
    if weights not in (None, "imagenet"):
        _check_run_backbone(weights, name)
    # The options every kind of backbone takes.
    options = dict(
        weights=weights,
        input_size=input_size,
        dropout=dropout,
        include_top=include_top,
        batchnorm_momentum=batchnorm_momentum,
        weights_preprocessing=weights_preprocessing,
    )
    if kind in ("efficientnet", "tiny", "small"):
        return _build_own(
            kind, what, num_classes, activation, drop_connect_rate, any_size, options
        )
    label = what.name if kind == "family" else f"kerashub:{what}"
    _check_fixed_options(label, any_size, activation, drop_connect_rate)
    if kind == "kerashub":
        return kerashub.build(what, num_classes, pretrained=pretrained, **options)
    return _build_application(what, num_classes, **options)


def _build_own(
    kind, what, num_classes, activation, drop_connect_rate, any_size, options
):
    """EfficientNet, ``small-resnet`` or ``tiny-cnn``: our own builders, which
    honour every option (the last two have no stochastic depth)."""
    if kind == "efficientnet":
        return efficientnet(
            what,
            num_classes,
            activation=activation,
            drop_connect_rate=drop_connect_rate,
            any_size=any_size,
            **options,
        )
    if kind == "small":
        width, blocks = what
        return small_resnet.small_resnet(
            num_classes,
            width=width,
            blocks=blocks,
            activation=activation,
            any_size=any_size,
            **options,
        )
    # No residual branches: drop_connect_rate has nothing to drop.
    return tiny.tiny_cnn(
        num_classes, activation=activation, any_size=any_size, **options
    )


def _check_fixed_options(label, any_size, activation, drop_connect_rate) -> None:
    """Options only our own builders honour must keep their defaults."""
    if any_size:
        raise ValueError(f"{label}: any_size is for EfficientNet backbones only")
    if activation != "auto":
        raise ValueError(
            f"{label}: activation={activation!r} cannot be changed for this "
            "backbone; leave it at the default 'auto'"
        )
    if drop_connect_rate != 0.2:
        raise ValueError(
            f"{label}: drop_connect_rate={drop_connect_rate} cannot be set for this "
            "backbone; leave it at the default 0.2"
        )


def _build_application(
    fam: Family,
    num_classes: int,
    *,
    weights,
    input_size,
    dropout,
    include_top,
    batchnorm_momentum,
    weights_preprocessing,
) -> keras.Model:
    """A keras.applications family with our head, its options checked."""
    if weights_preprocessing != "auto":
        raise ValueError(
            f"{fam.name}: weights_preprocessing={weights_preprocessing!r} cannot be "
            "set for this keras.applications family (it owns its preprocessing); "
            "leave it at 'auto'"
        )
    size = int(input_size or fam.size)
    if size < fam.min_size:
        raise ValueError(f"{fam.name}: input_size {size} < minimum {fam.min_size}")
    model = _build_family(fam, num_classes, size, weights, dropout, include_top)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = batchnorm_momentum
    return model


def _check_run_backbone(weights: str, backbone: str) -> None:
    """A run folder trained with another registry backbone fails with both names
    (a missing path too; a weights record's tag or name is for the builder)."""
    named = weights in records.tags() or weights in records.records()
    if named and not os.path.exists(os.path.expanduser(weights)):
        return
    src = loader.resolve_source(weights)
    if not src.backbone or "kerashub:" in (src.backbone + backbone).lower():
        return
    try:
        same = resolve(src.backbone) == resolve(backbone)
    except ValueError:
        return
    if not same:
        raise WeightsError(
            f"{src.run}: the run trained model.backbone={src.backbone}, this model "
            f"is {backbone}; set model.backbone={src.backbone}"
        )


def _build_family(fam, num_classes, size, weights, dropout, include_top):
    inputs = keras.Input((size, size, 3), name="input_layer")
    x = inputs
    if fam.mode:
        x = common.ImageNetPreprocess(fam.mode, name="preprocess")(x)
    kw = dict(include_top=False, input_tensor=x, weights=None)
    if fam.builtin_preprocessing:
        kw["include_preprocessing"] = True
    convnext = fam.name.startswith("convnext")
    kw["pooling"] = None  # our head pools, under one name ("avg_pool")
    if weights == "imagenet":
        kw["weights"] = "imagenet"
        try:
            with records.socket_timeout(records.DOWNLOAD_TIMEOUT):
                backbone = getattr(keras.applications, fam.constructor)(**kw)
        except Exception as e:
            if "URL fetch failure" not in str(e) and not isinstance(e, OSError):
                raise
            url = re.search(r"URL fetch failure on (\S+?):? ", str(e))
            url = url[1] if url else "keras.applications"
            raise WeightsUnavailableError(
                records.offline_hint(
                    f"ImageNet weights for {fam.name}", url.rsplit("/", 1)[-1], url
                )
                + f" Cause: {e}"
            ) from e
    else:
        backbone = getattr(keras.applications, fam.constructor)(**kw)
    x = backbone.output
    if convnext:
        # keras' notop ConvNeXt ends in an unnamed LayerNorm over the feature map;
        # its top model instead pools, then applies "<name>_head_layernorm". Rebuild
        # the latter (same weights) so top and notop files both load.
        final_norm = backbone.layers[-1]
        if not isinstance(final_norm, keras.layers.LayerNormalization):
            raise RuntimeError(f"{fam.name}: unexpected keras.applications layout")
        x = keras.layers.GlobalAveragePooling2D(name=common.POOL_NAME)(final_norm.input)
        x = keras.layers.LayerNormalization(
            epsilon=1e-6, name=f"{fam.keras_name}_head_layernorm"
        )(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name=common.POOL_NAME)(x)
    if include_top:
        outputs = common.classifier_head(x, num_classes, dropout=dropout, pool=False)
    else:
        outputs = x
    model = keras.Model(inputs, outputs, name=fam.name)
    if weights not in (None, "imagenet"):
        loader.load_weights(model, weights)
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def supports_any_size(name: str) -> bool:
    """Whether ``build_model(name, any_size=True)`` works: our EfficientNet builder
    pads its strided convolutions for a nominal size, so its weights behave the
    same at any input side, and ``small-resnet`` and ``tiny-cnn`` pad the same at
    every side; other
    families (position embeddings, pads from the input shape) keep one model per
    size."""
    return resolve(name)[0] in ("efficientnet", "tiny", "small")


def build_from_config(
    model_cfg: ModelConfig,
    num_classes: int,
    image_size: int | None = None,
    *,
    pretrained: bool = True,
    any_size: bool = False,
) -> keras.Model:
    """``build_model`` with the settings of a run config's ``model`` section.

    ``pretrained=False`` builds the architecture only, for loading a run's own
    weights: no download, no pretrained file or run folder needs to be attached.
    ``any_size`` leaves the input side open (see ``build_model``).
    """
    return build_model(
        model_cfg.backbone,
        num_classes,
        weights=model_cfg.weights,
        input_size=image_size,
        dropout=model_cfg.dropout,
        drop_connect_rate=model_cfg.drop_connect_rate,
        activation=model_cfg.activation,
        batchnorm_momentum=model_cfg.batchnorm_momentum,
        weights_preprocessing=model_cfg.weights_preprocessing,
        pretrained=pretrained,
        any_size=any_size,
    )
