"""``shopee_tpu.train(config)``: training that survives Kaggle sessions.

One call connects to the hardware, reads the TFRecords, builds and compiles the model
inside the accelerator's scope, and fits it with a checkpoint after every epoch. Run
the same call (or ``shopee-tpu train``) again after an interruption and it continues
from the last completed epoch with the optimizer state and learning-rate position
intact; a finished run is not retrained; a changed config is refused with the
difference named. A time budget (``time_limit``) stops cleanly before Kaggle's
session limit.

The whole run is three steps: ``_setup`` (the hardware, the records, the plan),
``_fit`` (one ``model.fit`` per phase of the plan) and ``_finish`` (the best
weights, the metrics, the report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Unpack

from shopee_tpu.config import RunConfig
from shopee_tpu.data.manifests import manifest_beside
from shopee_tpu.data.read import pipeline
from shopee_tpu.data.read.shapes import any_image_size  # TensorFlow, when called
from shopee_tpu.data.write.sources import class_names
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.shared_folder import open_training_run
from shopee_tpu.training.options import (
    SingleRunOptions,
    accelerator_for,
    check_options,
    verbosity,
)
from shopee_tpu.training.plan import (
    Phase,
    describe_phase,
    epoch_steps,
    make_plan,
    phase_at,
    plan_phases,
)
from shopee_tpu.training.state import RunRecords, RunState

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: The trained model, holding the best weights by validation accuracy.
        metrics: What ``metrics.json`` holds.
        history: One row per completed epoch.
        out_dir: The run folder.
        label_map: ``{category: class_id}`` of the training records.
    """

    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    out_dir: str
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Category names in class-id order."""
        return class_names(self.label_map)


class Fitted(NamedTuple):
    """What the fits of one ``train()`` call leave: the model (``None`` when
    nothing was trained), its last phase, why it stopped early (the time budget,
    a user's callback), and whether the run is finished (every epoch, or stopped
    by a callback)."""

    model: Any
    phase: Phase | None
    stop_reason: str | None
    finished: bool


NOT_TRAINED = Fitted(None, None, None, False)


def train(
    config: RunConfig,
    *,
    out_dir: str | None = None,
    record_ids: dict[str, list[str]] | None = None,
    **options: Unpack[SingleRunOptions],
) -> TrainResult:
    """Trains (or resumes) the run described by ``config``.

    Args:
        config: The run config; ``config.data.train`` names the training records.
        out_dir: Run folder; defaults to ``config.out_dir``.
        record_ids: ``{"train": ids, "valid": ids}``: train on and validate on
            these records of ``data.train`` (one fold of a k-fold run, see
            ``shopee_tpu.experiments.kfold``).
        **options: How this call trains: ``time_limit``, ``checkpoint_every``,
            ``device``, ``accelerator``, ``verbose``, ``callbacks``,
            ``resume_stopped``, ``predict_images``, ``fit_to_time``; each is
            documented in ``shopee_tpu.training.options`` (``TrainOptions``,
            ``SingleRunOptions``).

    Returns:
        The ``TrainResult``.

    Raises:
        ConfigMismatch: ``out_dir`` holds a run trained with a different config.
        ValueError: ``config.data.train`` is unset or holds no records, or the
            config is a k-fold run's (train those with ``train_folds``).
        TypeError: An option that is not one of those above.
    """
    check_options("train", options, SingleRunOptions)
    run = _setup(config, out_dir, record_ids, options)
    fitted = NOT_TRAINED
    folder, epochs = run.folder, run.config.epochs
    resume_stopped = options.get("resume_stopped", False)
    if folder.finished and (folder.epoch >= epochs or not resume_stopped):
        run.say(f"finished run ({folder.epoch} of {epochs} epochs); not retrained")
        fitted = Fitted(None, None, folder.state.get("stop_reason"), True)
    elif folder.epoch < epochs:
        time_limit = options.get("time_limit")
        fit_to = time_limit if options.get("fit_to_time", True) else None
        plan = (fit_to, options.get("predict_images", 0))
        every = options.get("checkpoint_every", 60.0)
        fitted = _fit(run, time_limit, every, options.get("callbacks") or [], plan)
    return _finish(run, fitted)


def _setup(config, out_dir, record_ids, options: SingleRunOptions) -> RunState:
    """The hardware, the run folder, the records and the plan of a run."""
    start = time.monotonic()
    verbose = verbosity(options)
    config = config.replace(out_dir=out_dir or config.out_dir)
    if not config.data.train:
        raise ValueError("config.data.train is not set: point it at a TFRecord folder")
    if (config.data.folds or config.data.fold is not None) and record_ids is None:
        raise ValueError(
            "a k-fold config (data.folds): train it with "
            "shopee_tpu.experiments.kfold.train_folds (shopee-tpu train --folds K)"
        )
    acc = accelerator_for(config, options)
    folder = open_training_run(config, acc)
    verbose = verbose if acc.chief else 0  # one progress bar per run, not per host
    files = pipeline.list_files(config.data.train)
    label_map = {
        str(k): int(v)
        for k, v in manifest_beside(files[0]).get("label_map", {}).items()
    }
    if not label_map:
        raise ValueError(
            f"{config.data.train}: no manifest.json with a label map next to the "
            "records; write them with `shopee-tpu tfrecords`"
        )
    records = _records(config, files, record_ids)
    if acc.chief:
        folder.save_label_map(label_map)
    from shopee_tpu.models import input_spec, supports_any_size  # Keras: after connect

    image_size = config.data.image_size or input_spec(config.model.backbone).size
    n_train = _count(records.train, records.train_ids)
    n_valid = _count(records.valid, records.valid_ids) if records.valid else 0
    steps, per_call = epoch_steps(
        config, n_train, acc.batch_size(config.batch_size), verbose,
        limit=acc.max_steps_per_execution,
    )  # fmt: skip
    # The plan may pick the epoch count from the data size and cut the run into
    # phases (progressive resizing, a frozen warmup): see shopee_tpu.training.plan.
    epochs, phases = make_plan(config, n_train, image_size)
    asked = epochs
    # A time limit's plan, committed with the run, holds when it resumes.
    if planned := int(acc.from_chief(float(folder.planned_epochs or 0))):
        epochs = min(epochs, planned)
        phases = plan_phases(config.plan, epochs, image_size)
    config = config.replace(epochs=epochs)
    # Progressive resizing on TensorFlow (CPU, GPU) trains one model with an open
    # input side: one traced graph serves every size, where a model per size costs
    # a trace per phase and a rebuild. TPUs need static shapes, and JAX compiles
    # per shape anyway: a model per phase there.
    one_model = (
        len({p.image_size for p in phases}) > 1
        and acc.backend == "tensorflow"
        and acc.kind != "tpu"
        and supports_any_size(config.model.backbone)
    )
    run = RunState(
        config, acc, folder, verbose, start, label_map, records, image_size,
        n_train, n_valid, steps, per_call, phases, one_model, asked,
    )  # fmt: skip
    if not run.validate:
        run.say(
            "no validation hold-out (data.valid_fraction=0): training on all "
            f"{n_train} records and keeping the last epoch's weights"
        )
    return run


def _records(config: RunConfig, files: list[str], record_ids) -> RunRecords:
    """The training and validation records, in the order of precedence: the ids
    given (a fold), ``data.valid``, the records' own split, a hold-out of shards.
    ``valid_fraction=0`` trains on every record: nothing to pick a best epoch by,
    so each epoch's (EMA) weights become ``best`` and the last epoch's stay."""
    if record_ids is not None:
        return RunRecords(files, files, record_ids["train"], record_ids["valid"])
    if config.data.valid:
        valid = pipeline.list_files(config.data.valid)
    elif own := manifest_beside(files[0]).get("valid"):
        # Records that carry their own split (`shopee-tpu cdiscount prepare`).
        valid = pipeline.list_files(f"{files[0].rsplit('/', 1)[0]}/{own}")
    else:
        files, valid = pipeline.holdout_files(
            files, config.data.valid_fraction, config.seed
        )
    return RunRecords(files, valid)


def _count(files: list[str], ids) -> int:
    return len(ids) if ids is not None else pipeline.count_records(files)


def _common(run: RunState, phase: Phase) -> dict:
    acc = run.acc
    return dict(
        schema=run.config.data.schema,
        image_size=phase.image_size,
        batch_size=acc.host_batch_size(run.config.batch_size),
        num_classes=len(run.label_map),
        num_workers=acc.num_workers,
        worker_index=acc.worker_index,
    )


def _valid_dataset(run: RunState, phase: Phase):
    """Validation batches: full on any replica count, padding rows weigh 0."""
    if not run.validate:
        return None
    return pipeline.eval_dataset(
        run.records.valid,
        labels=True,
        pad=True,
        cache=run.config.data.cache,
        keep_ids=run.records.valid_ids,
        **_common(run, phase),
    )


def _datasets(run: RunState, phase: Phase):
    """The training and validation datasets of one phase."""
    cfg = run.config
    train_ds = pipeline.train_dataset(
        run.records.train,
        augment=cfg.augment,
        seed=cfg.seed + phase.start,
        shuffle_buffer=cfg.data.shuffle_buffer,
        deterministic=cfg.data.deterministic,
        keep_ids=run.records.train_ids,
        **_common(run, phase),
    )
    valid_ds = _valid_dataset(run, phase)
    if run.one_model:
        train_ds, valid_ds = any_image_size(train_ds), any_image_size(valid_ds)
    return train_ds, valid_ds


def _build(
    run: RunState, phase: Phase, resume_from: int, *, any_size: bool | None = None
):
    """The compiled model of one phase, resumed from the run folder."""
    import keras  # deferred: Keras only after connect()

    from shopee_tpu.models import build_from_config, compile_model
    from shopee_tpu.models.finetune import prepare_phase, resume_phase

    cfg, acc = run.config, run.acc
    any_size = run.one_model if any_size is None else any_size
    # Seeded right before building: every process draws the same initial weights
    # whatever it did before (several JAX hosts must agree on them).
    keras.utils.set_random_seed(cfg.seed)
    with acc.scope():
        model = build_from_config(
            cfg.model,
            len(run.label_map),
            image_size=run.image_size if any_size else phase.image_size,
            any_size=any_size,
        )
        prepare_phase(model, phase.frozen, cfg.plan)
        backbone_lr = cfg.plan.backbone_lr
        compile_model(
            model,
            cfg.optim.replace(steps_per_execution=run.per_call),
            steps_per_epoch=run.steps,
            epochs=cfg.epochs,
            replicas=acc.replicas,
            backbone_lr=backbone_lr
            if cfg.plan.freeze_epochs and not phase.frozen
            else 1.0,
        )
        if resume_from > 0:
            before = phase_at(run.phases, resume_from - 1)
            resume_phase(
                run.folder, model, was_frozen=before.frozen, frozen=phase.frozen,
                steps=run.steps, epoch=resume_from,
            )  # fmt: skip
    return model


def _fit(
    run: RunState,
    time_limit: float | None,
    checkpoint_every: float,
    extra: list,
    plan: tuple = (None, 0),
) -> Fitted:
    """Trains the remaining epochs, one ``fit`` per phase (see ``Fitted``). With
    ``plan`` (the time to fit into, the images predicted after) the epoch count
    and the phases may change while a fit runs (``run.config.epochs``,
    ``run.phases``); the fit then ends where the new plan needs the next
    phase."""
    from shopee_tpu.training.callbacks import training_callbacks

    folder = run.folder
    epoch = folder.epoch
    if epoch:
        run.say(f"resuming after epoch {epoch} of {run.config.epochs}")
    phase = phase_at(run.phases, epoch)
    train_ds, valid_ds = _datasets(run, phase)
    model = _build(run, phase, epoch)
    callbacks, budget, commit, plan = training_callbacks(
        run, time_limit, checkpoint_every, extra, plan
    )
    while True:  # the next phase resumes from the run folder's checkpoint
        commit.image_size, plan.phase = phase.image_size, phase
        model.fit(
            train_ds,
            epochs=phase.end,
            initial_epoch=epoch,
            steps_per_epoch=run.steps,
            validation_data=valid_ds,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself
            verbose=0,
        )
        if budget.reason:
            return Fitted(model, phase, budget.reason, False)
        if folder.epoch >= run.config.epochs:
            return Fitted(model, phase, None, True)
        if folder.epoch < phase.end and folder.epoch != plan.switch_at:
            stopped = f"stopped by a callback after epoch {folder.epoch}"
            return Fitted(model, phase, stopped, True)  # a user's callback
        epoch, before = folder.epoch, phase
        phase = phase_at(run.phases, epoch)
        if run.verbose:
            print(f"epoch {epoch + 1}: {describe_phase(phase)}")
        train_ds, valid_ds = _datasets(run, phase)
        if not run.one_model or phase.frozen != before.frozen:
            model = _build(run, phase, epoch)
        else:  # `fit` left the EMA weights in: back to the committed state
            folder.restore(model)


def _finish(run: RunState, fitted: Fitted) -> TrainResult:
    """The returned model (the best weights, at the full size), the metrics and
    the report; marks the run finished (every epoch done, or stopped by a
    callback)."""
    from shopee_tpu.training.report import final_metrics, report

    cfg, acc, folder = run.config, run.acc, run.folder
    model, phase, stop_reason, finished = fitted
    last = run.phases[-1]
    other = phase is None or (phase.image_size, phase.frozen) != (
        last.image_size,
        last.frozen,
    )
    if model is None or run.one_model or other:
        # The full size, fixed: not trained now, stopped early, or open-sized.
        model = _build(run, run.phases[-1], 0, any_size=False)
    valid_ds = _valid_dataset(run, run.phases[-1])
    if acc.chief:
        folder.mark_finished(finished, stop_reason=stop_reason)
    if acc.num_workers > 1:  # the others read what the chief committed
        acc.sync("shopee_tpu.train.end")
        folder = folder if acc.chief else RunFolder(cfg.out_dir, writable=False)
    if folder.exists(RunFolder.BEST):
        folder.restore(model, optimizer=False, which=RunFolder.BEST)
    metrics = final_metrics(run, folder, stop_reason, finished)
    if acc.chief or acc.backend == "jax":  # JAX: every host takes part in predicting
        report(run, folder, model, valid_ds, metrics)
    if acc.chief:
        folder.save_metrics(metrics)
    note = f" (stopped: {stop_reason})" if stop_reason else ""
    best = metrics["best_val_accuracy"]
    result = f"best val accuracy {best}" if run.validate else "no validation"
    run.say(f"{folder.epoch}/{cfg.epochs} epochs{note}; {result}")
    return TrainResult(model, metrics, folder.history, cfg.out_dir, run.label_map)
