"""The training plan: how many epochs, and in which phases.

A run is cut into phases by two settings of ``RunConfig.plan`` (``PlanConfig``):

* **progressive resizing** (``plan.sizes``): the first epochs train on smaller
  images, which are several times cheaper, then the size grows to the full
  ``image_size`` for the rest;
* **fine-tuning** (``plan.freeze_epochs``): with attached weights, the first epochs
  train only the head while the backbone is frozen (its BatchNorm layers in
  inference mode), then the backbone is unfrozen at ``plan.backbone_lr`` times
  the learning rate.

A phase that changes the trainable set rebuilds the model and continues from the
run folder's last checkpoint, so that phase change is exactly a resume, and a run
killed anywhere, in any phase, resumes the same way. Size changes keep one model
with an open input side on TensorFlow CPUs and GPUs (fed by datasets whose image
side is left open, ``data.read.shapes.any_image_size``: one traced graph for every
size); on TPUs and JAX every size gets its own model, rebuilt from the checkpoint
(convolution weights do not depend on the image size). The learning-rate schedule
runs over the whole run by optimizer step, unaffected by the phases.
``plan.images_seen`` picks the epoch count from the size of the training set.

This module only plans: what trains in a phase and how a phase resumes are
``models.finetune.prepare_phase`` and ``resume_phase``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from shopee_tpu.config import PlanConfig, RunConfig

__all__ = [
    "Phase",
    "epoch_steps",
    "make_plan",
    "plan_epochs",
    "plan_phases",
    "phase_at",
    "describe_phase",
]


@dataclass(frozen=True)
class Phase:
    """A run of epochs with one image size and one trainable set.

    Attributes:
        start: First epoch of the phase (0-based, as ``fit``'s ``initial_epoch``).
        end: One past its last epoch (``fit``'s ``epochs``).
        image_size: Side of the images in this phase.
        frozen: The backbone is frozen; only the head trains.
    """

    start: int
    end: int
    image_size: int
    frozen: bool = False


def make_plan(
    config: RunConfig, train_images: int, image_size: int
) -> tuple[int, list[Phase]]:
    """The epoch count and the phases of a run (see the module docstring).

    Warns when a frozen warmup is asked for a backbone without weights: freezing
    random features only wastes those epochs.
    """
    if config.plan.freeze_epochs > 0 and not config.model.weights:
        warnings.warn(
            f"plan.freeze_epochs={config.plan.freeze_epochs} freezes a randomly "
            "initialised backbone: set model.weights to a weights file to fine-tune "
            "(or use a from-scratch preset such as 'photo')",
            stacklevel=2,
        )
    epochs = plan_epochs(config, train_images)
    return epochs, plan_phases(config.plan, epochs, image_size)


def plan_epochs(config: RunConfig, train_images: int) -> int:
    """The epoch count: ``config.epochs``, or from the data size (``plan.images_seen``).

    With ``images_seen`` set, a 1,200-image set at ``images_seen=36000`` gets 30
    epochs and a 100,000-image set gets ``min_epochs``; never more than
    ``config.epochs``.
    """
    plan = config.plan
    if plan.images_seen <= 0:
        return config.epochs
    wanted = math.ceil(plan.images_seen / max(1, train_images))
    return int(min(config.epochs, max(plan.min_epochs, wanted)))


def plan_phases(plan: PlanConfig, epochs: int, image_size: int) -> list[Phase]:
    """Cuts ``epochs`` into phases (one when ``plan`` asks for nothing special).

    Raises:
        ValueError: A progressive size not below ``image_size``, or a bad fraction.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    sizes = [int(s) for s in plan.sizes]
    if any(not 0 < s < image_size for s in sizes) or sizes != sorted(sizes):
        raise ValueError(
            f"plan.sizes {tuple(sizes)}: expected increasing sides below the full "
            f"image size {image_size}"
        )
    if sizes and not 0 < plan.resize_fraction < 1:
        raise ValueError(
            f"plan.resize_fraction must be in (0, 1), got {plan.resize_fraction}"
        )
    # Epoch at which each size starts; the full size always gets >= 1 epoch.
    small = min(epochs - 1, round(epochs * plan.resize_fraction)) if sizes else 0
    starts = [round(k * small / len(sizes)) for k in range(len(sizes))] + [small]
    cuts = {0, *starts, min(plan.freeze_epochs, epochs)}
    bounds = sorted(c for c in cuts if c < epochs)
    phases = []
    all_sizes = sizes + [image_size]
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else epochs
        size = all_sizes[max(k for k, s in enumerate(starts) if s <= start)]
        phases.append(Phase(start, end, size, frozen=start < plan.freeze_epochs))
    return _merge(phases)


def _merge(phases: list[Phase]) -> list[Phase]:
    """Joins neighbours with the same size and trainable set."""
    out: list[Phase] = []
    for p in phases:
        if out and (out[-1].image_size, out[-1].frozen) == (p.image_size, p.frozen):
            out[-1] = Phase(out[-1].start, p.end, p.image_size, p.frozen)
        elif p.end > p.start:
            out.append(p)
    return out


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that trains ``epoch`` (0-based); the last one past the end."""
    for p in phases:
        if p.start <= epoch < p.end:
            return p
    return phases[-1]


def describe_phase(phase: Phase) -> str:
    """One line for logs: ``64 px, backbone frozen, epochs 1-2``."""
    what = "backbone frozen" if phase.frozen else "all layers train"
    return f"{phase.image_size} px, {what}, epochs {phase.start + 1}-{phase.end}"


def epoch_steps(
    config: RunConfig,
    n_train: int,
    global_batch: int,
    verbose: int,
    *,
    limit: int | None = None,
) -> tuple[int, int]:
    """Steps per epoch, and steps per compiled call that divide them.

    Keras runs ``steps_per_execution`` steps per call even past the end of an
    epoch (the training data repeats), so a count that does not divide the epoch
    would stretch it: 32 steps in an epoch of 31, optimizer iterations that are no
    longer a multiple of the epoch, and a schedule that drifts. A derived epoch is
    rounded down to a multiple of the calls (less than one call's worth of
    batches); an explicit ``steps_per_epoch`` is kept and the call shrinks to its
    largest divisor. An epoch shorter than one call is one call. ``limit`` caps
    the steps per call where the accelerator cannot run more.
    """
    asked = max(1, int(config.optim.steps_per_execution))
    if limit is not None and asked > limit:
        if verbose:
            print(
                f"shopee_tpu: steps_per_execution {limit} instead of {asked}: more "
                "steps per call fail under this strategy (keras-team/keras#19246)"
            )
        asked = limit
    if config.steps_per_epoch:
        steps = int(config.steps_per_epoch)
        per_call = max(d for d in range(1, min(asked, steps) + 1) if steps % d == 0)
    else:
        whole = max(1, n_train // global_batch)
        steps = whole - whole % asked if whole >= asked else whole
        per_call = min(asked, steps)
        if verbose and steps != whole:
            print(
                f"shopee_tpu: {steps} steps per epoch instead of {whole}, a multiple "
                f"of steps_per_execution={asked}"
            )
    if verbose and per_call != asked:
        print(
            f"shopee_tpu: steps_per_execution {per_call} instead of {asked}, so "
            f"that it divides the {steps} steps of an epoch"
        )
    return steps, per_call
