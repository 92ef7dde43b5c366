"""``shopee_tpu.train(config)``: training that survives Kaggle sessions.

One call connects to the hardware, reads the TFRecords, builds and compiles the model
inside the accelerator's scope, and fits it with a checkpoint after every epoch. Run
the same call (or ``shopee-tpu train``) again after an interruption and it continues
from the last completed epoch with the optimizer state and learning-rate position
intact; a finished run is not retrained; a changed config is refused with the
difference named. A time budget (``time_limit``) stops cleanly before Kaggle's
session limit.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shopee_tpu.checkpoints import RunFolder
from shopee_tpu.config import RunConfig
from shopee_tpu.utils import atomic_write_text

if TYPE_CHECKING:
    from shopee_tpu.experiments.kfold import KFoldResult

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


def class_names(label_map: dict[str, int]) -> list[str]:
    """Category names in class-id order, from a ``{category: class_id}`` map."""
    return [k for k, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


def train(
    config: RunConfig,
    *,
    out_dir: str | None = None,
    time_limit: float | None = None,
    checkpoint_every: float = 60.0,
    device: str | None = None,
    accelerator=None,
    verbose: int | None = None,
    folds: int | None = None,
    fold: int | None = None,
) -> TrainResult | KFoldResult:
    """Trains (or resumes) the run described by ``config``.

    Args:
        config: The run config; ``config.data.train`` names the training records.
        out_dir: Run folder; defaults to ``config.out_dir``.
        time_limit: Seconds of wall time this call may use (``--time-limit 8h45m``).
            Training stops after the last epoch that fits, with its checkpoint.
        checkpoint_every: Seconds of training between checkpoints: an epoch is
            committed once this much time has passed since the last commit, when
            it is the best so far, and at the end of each fit (phase, run, time
            limit). A crash loses at most this much; 0 commits every epoch.
        device: Overrides ``config.device`` for ``connect()``.
        accelerator: An ``Accelerator`` from ``shopee_tpu.connect()`` to reuse.
        verbose: 1 shows progress bars, 0 is silent; ``None`` picks 1.
        folds: Train a k-fold run of K folds instead (``config.data.folds`` does the
            same); see ``shopee_tpu.experiments.kfold``.
        fold: With ``folds``: train only this fold.

    Returns:
        A ``TrainResult``; for a k-fold run a ``KFoldResult``.

    Raises:
        ConfigMismatch: ``out_dir`` holds a run trained with a different config.
        ValueError: ``config.data.train`` is unset or holds no records.
    """
    from shopee_tpu.accelerator import connect

    whole_kfold_run = config.data.folds and config.data.fold is None
    if folds is not None or fold is not None or whole_kfold_run:
        from shopee_tpu.experiments.kfold import train_folds

        return train_folds(
            config,
            folds=folds,
            fold=fold,
            out_dir=out_dir,
            time_limit=time_limit,
            checkpoint_every=checkpoint_every,
            device=device,
            accelerator=accelerator,
            verbose=verbose,
        )

    start = time.monotonic()
    verbose = 1 if verbose is None else verbose
    out_dir = out_dir or config.out_dir
    config = config.replace(out_dir=out_dir)
    if not config.data.train:
        raise ValueError("config.data.train is not set: point it at a TFRecord folder")

    acc = accelerator or connect(
        device or config.device,
        mixed_precision=config.mixed_precision,
        verbose=verbose > 0,
    )
    # Keras (and the modules that import it) only now: connect() chose its
    # backend, JAX on a TPU VM.
    import keras

    from shopee_tpu.callbacks import (
        EpochCommit,
        Progress,
        TimeBudget,
        UnpaddedValidationLoss,
    )
    from shopee_tpu.data import pipeline
    from shopee_tpu.models import (
        build_from_config,
        compile_model,
        input_spec,
        make_schedule,
        supports_any_size,
    )
    from shopee_tpu.models.finetune import scale_backbone_lr
    from shopee_tpu.plan import (
        any_image_size,
        describe_phase,
        make_plan,
        phase_at,
        prepare_phase,
        resume_phase,
    )

    chief = acc.worker_index == 0
    run = _open_run(out_dir, config, acc)
    verbose = verbose if chief else 0  # one progress bar per run, not per host

    files = pipeline.list_files(config.data.train)
    manifest = _manifest_near(files)
    label_map = {
        str(k): int(v) for k, v in (manifest or {}).get("label_map", {}).items()
    }
    num_classes = len(label_map) or None
    if num_classes is None:
        raise ValueError(
            f"{config.data.train}: no manifest.json with a label map next to the records; "
            "write them with `shopee-tpu tfrecords`"
        )
    train_files, valid_files, keep = _split(config, files, manifest)
    if chief:
        atomic_write_text(
            run.file("label_map.json"), json.dumps(label_map, indent=1) + "\n"
        )

    image_size = config.data.image_size or input_spec(config.model.backbone).size
    global_batch = acc.batch_size(config.batch_size)
    n_train = len(keep["train"]) if keep else pipeline.count_records(train_files)
    # valid_fraction=0 trains on every record: nothing to pick a best epoch by, so
    # each epoch's (EMA) weights become `best` and the last epoch's are returned.
    validate = bool(keep or valid_files)
    steps, per_call = _epoch_steps(
        config, n_train, global_batch, verbose, limit=acc.max_steps_per_execution
    )
    host_batch = acc.host_batch_size(config.batch_size)
    n_valid = valid_rows = 0
    if validate:
        n_valid = len(keep["valid"]) if keep else pipeline.count_records(valid_files)
        valid_rows = global_batch * pipeline.eval_batches(
            valid_files, host_batch, acc.num_workers, keep.get("valid")
        )
    elif verbose:
        print(
            f"{out_dir}: no validation hold-out (data.valid_fraction=0): training on "
            f"all {n_train} records and keeping the last epoch's weights"
        )
    # The plan may pick the epoch count from the data size and cut the run into
    # phases (progressive resizing, a frozen warmup): see shopee_tpu.plan.
    epochs, phases = make_plan(config, n_train, image_size)
    config = config.replace(epochs=epochs)

    # Progressive resizing on TensorFlow (CPU, GPU) trains one model with an open
    # input side, fed through datasets without a static image side: one traced
    # graph serves every size, where a model per size costs a trace per phase
    # (~40 s for a small EfficientNet on 2 cores) and a rebuild and restore. TPUs
    # need static shapes, and JAX compiles per shape anyway: a model per phase.
    one_model = (
        len({p.image_size for p in phases}) > 1
        and acc.backend == "tensorflow"
        and acc.kind != "tpu"
        and supports_any_size(config.model.backbone)
    )

    def datasets(phase):
        """The training and validation datasets of one phase."""
        common = dict(
            schema=config.data.schema,
            image_size=phase.image_size,
            batch_size=host_batch,
            num_classes=num_classes,
            num_workers=acc.num_workers,
            worker_index=acc.worker_index,
        )
        train_ds = pipeline.load_dataset(
            train_files,
            training=True,
            augment=config.augment,
            seed=config.seed + phase.start,
            shuffle_buffer=config.data.shuffle_buffer,
            deterministic=config.data.deterministic,
            keep_ids=keep.get("train"),
            **common,
        )
        # Full batches on any replica count; padding rows weigh 0 in the metrics.
        valid_ds = (
            pipeline.load_dataset(
                valid_files,
                training=False,
                labels=True,
                pad=True,
                cache=config.data.cache,
                keep_ids=keep.get("valid"),
                **common,
            )
            if validate
            else None
        )
        if one_model:
            train_ds, valid_ds = any_image_size(train_ds), any_image_size(valid_ds)
        return train_ds, valid_ds

    def build(phase, resume_from: int, *, any_size: bool = one_model):
        """The compiled model of one phase, resumed from the run folder."""
        # Seeded right before building: every process draws the same initial
        # weights whatever it did before (several JAX hosts must agree on them).
        keras.utils.set_random_seed(config.seed)
        with acc.scope():
            model = build_from_config(
                config.model,
                num_classes,
                image_size=image_size if any_size else phase.image_size,
                any_size=any_size,
            )
            prepare_phase(model, phase, config.plan)
            compile_model(
                model,
                config.optim.replace(steps_per_execution=per_call),
                steps_per_epoch=steps,
                epochs=config.epochs,
                replicas=acc.replicas,
            )
            if config.plan.freeze_epochs > 0 and not phase.frozen:
                scale_backbone_lr(model.optimizer, model, config.plan.backbone_lr)
            if resume_from > 0:
                resume_phase(run, model, phases, phase, steps, resume_from)
        return model

    phase = phase_at(phases, run.epoch)
    train_ds, valid_ds = datasets(phase)
    model = build(phase, run.epoch)

    # The same pure function the optimizer uses, for the LR column and plot.
    schedule = make_schedule(config.optim, steps, config.epochs, acc.replicas)
    done = run.epoch
    stop_reason = None
    if run.state.get("finished") and done >= config.epochs:
        if verbose:
            print(f"{out_dir}: finished run ({done} epochs); not retrained")
    elif done < config.epochs:
        if verbose and done:
            print(f"{out_dir}: resuming after epoch {done} of {config.epochs}")
        budget = TimeBudget(run, start, time_limit, agree=acc.from_chief)
        # EMA weights are swapped in for validation only; the commit saves the raw
        # weights as `last` (they belong with the optimizer state) and the EMA
        # weights, which were scored, as `best`.
        swapper = keras.callbacks.SwapEMAWeights() if config.optim.ema else None
        commit = EpochCommit(
            run,
            steps,
            global_batch,
            schedule,
            write=chief,
            ema=swapper,
            monitor="val_accuracy" if validate else None,
            every=checkpoint_every,
            agree=acc.from_chief,
        )
        # The budget decides first: the commit saves the epoch it stops at.
        callbacks = [
            UnpaddedValidationLoss(valid_rows / max(1, n_valid)),
            budget,
            commit,
        ]
        if swapper is not None:
            callbacks.insert(0, swapper)
        if verbose:
            callbacks.append(Progress(config.epochs, steps))
        epoch = done
        while True:  # one fit per phase; the next phase resumes from its checkpoint
            commit.image_size = phase.image_size
            model.fit(
                train_ds,
                epochs=phase.end,
                initial_epoch=epoch,
                steps_per_epoch=steps,
                validation_data=valid_ds,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles itself
                verbose=0,
            )
            if budget.reason or phase.end >= config.epochs:
                break
            epoch, before, phase = phase.end, phase, phase_at(phases, phase.end)
            if verbose:
                print(f"epoch {epoch + 1}: {describe_phase(phase)}")
            train_ds, valid_ds = datasets(phase)
            if not one_model or phase.frozen != before.frozen:
                model = build(phase, epoch)
            else:  # `fit` left the EMA weights in: back to the committed state
                run.restore(model)
        stop_reason = budget.reason
    if one_model or phase is not phases[-1]:
        # The model returned (and reported) takes the full size, fixed: stopped
        # early, or trained with an open side.
        phase = phases[-1]
        _, valid_ds = datasets(phase)
        model = build(phase, 0, any_size=False)
    finished = run.epoch >= config.epochs
    if chief:
        run.mark_finished(finished, stop_reason=stop_reason)
    if acc.num_workers > 1:  # the others read what the chief committed
        acc.sync("shopee_tpu.train.end")
        run = run if chief else RunFolder(out_dir)

    if run.exists(RunFolder.BEST):
        run.restore(model, optimizer=False, which=RunFolder.BEST)
    metrics = _final_metrics(run, config, acc, n_train, n_valid, start, stop_reason)
    metrics.update(
        steps_per_epoch=steps, steps_per_execution=per_call, hosts=acc.num_workers
    )
    metrics["validation_warnings"] = _warn_about_validation(run.history, config)
    if chief or acc.backend == "jax":  # JAX: every host takes part in predicting
        _report(run, model, valid_ds, schedule, steps, config, label_map, metrics, acc)
    if chief:
        atomic_write_text(
            run.file("metrics.json"), json.dumps(metrics, indent=1) + "\n"
        )
    if verbose:
        how_far = f"{run.epoch}/{config.epochs} epochs"
        note = f" (stopped: {stop_reason})" if stop_reason else ""
        print(
            f"{out_dir}: {how_far}{note}; "
            + (
                f"best val accuracy {metrics['best_val_accuracy']}"
                if validate
                else "no validation (the last epoch's weights)"
            )
        )
    return TrainResult(model, metrics, run.history, out_dir, label_map)


def _open_run(out_dir: str, config: RunConfig, acc) -> RunFolder:
    """The run folder, opened by the chief first: it completes an interrupted
    commit and saves the config; the other processes then only read."""
    if acc.chief:
        run = RunFolder(out_dir)
        run.check_config(config)
    acc.sync("shopee_tpu.train.open")
    if not acc.chief:
        run = RunFolder(out_dir)
        run.check_config(config, write=False)
    return run


def _split(
    config: RunConfig, files: list[str], manifest: dict | None
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """The training and validation records of a run, in the order of precedence:
    a k-fold run's fold, ``data.valid``, the records' own split, a hold-out.

    Returns:
        ``(train_files, valid_files, keep)``; ``keep`` is empty, or for one fold of
        a k-fold run maps "train" and "valid" to the record ids each side keeps
        (both read every file).
    """
    from shopee_tpu.data import pipeline

    if config.data.folds or config.data.fold is not None:
        # One fold of a k-fold run: its products are held out of all the records.
        from shopee_tpu.experiments.kfold import fold_ids

        return files, files, fold_ids(config, files)
    if config.data.valid:
        return files, pipeline.list_files(config.data.valid), {}
    if (manifest or {}).get("valid"):
        # Records that carry their own split (`shopee-tpu cdiscount prepare`).
        valid_dir = os.path.join(os.path.dirname(files[0]), manifest["valid"])
        return files, pipeline.list_files(valid_dir), {}
    train_files, valid_files = pipeline.holdout_files(
        files, config.data.valid_fraction, config.seed
    )
    return train_files, valid_files, {}


def _epoch_steps(
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


def _warn_about_validation(history, config) -> list[str]:
    """Warns (and returns the messages) when validation looks too easy."""
    from shopee_tpu.data.augment import needs_mixing
    from shopee_tpu.validation import validation_warnings

    found = validation_warnings(history, mixing=needs_mixing(config.augment))
    for message in found:
        warnings.warn(message, stacklevel=3)
    return found


def _manifest_near(files: list[str]) -> dict | None:
    from shopee_tpu.data.records import read_manifest

    folder = os.path.dirname(files[0]) if files else "."
    try:
        return read_manifest(folder)
    except FileNotFoundError:
        return None


def _final_metrics(run, config, acc, n_train, n_valid, start, stop_reason) -> dict:
    history = run.history
    best = run.state.get("best") or {}
    last = history[-1] if history else {}
    rates = [r["images_per_sec"] for r in history if r.get("images_per_sec")]
    return {
        "epochs_completed": run.epoch,
        "epochs": config.epochs,
        "finished": run.epoch >= config.epochs,
        "stop_reason": stop_reason,
        "final_val_accuracy": last.get("val_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "best_val_accuracy": best.get("value"),
        "best_epoch": best.get("epoch"),
        "images_per_sec": float(np.median(rates)) if rates else None,
        "wall_time_sec": round(time.monotonic() - start, 2),
        "train_images": n_train,
        "valid_images": n_valid,
        "replicas": acc.replicas,
        "device": acc.kind,
        "backend": acc.backend,
    }


def _report(
    run, model, valid_ds, schedule, steps, config, label_map, metrics, acc
) -> None:
    """Plots into the run folder and adds validation figures to ``metrics``.

    On several JAX hosts every host predicts its part of the validation records
    together with the others; the chief gathers the parts and writes.
    """
    from shopee_tpu import multihost, plots
    from shopee_tpu.inference.tta import tta_step

    names = class_names(label_map)
    if acc.chief:
        if run.history:
            plots.plot_history(run.history, run.file("history.png"))
        plots.plot_lr_schedule(
            schedule,
            steps * config.epochs,
            run.file("lr_schedule.png"),
            steps_per_epoch=steps,
        )
    # Split over the devices (and, on several JAX hosts, over the hosts), as fit
    # splits its batches.
    several = acc.backend == "jax" and acc.num_workers > 1
    if several:
        predict = multihost.predict_function(acc, model)
    else:
        one_view = tta_step(model, "identity")
        predict = lambda x: one_view(x)[:, 0]  # noqa: E731
    labels, probs = [], []
    samples = plots.PredictionSamples(16)
    for x, y, weight in valid_ds if valid_ds is not None else ():
        x, y = np.asarray(x), np.asarray(y)
        real = np.asarray(weight) > 0  # padding rows complete the last batch only
        p = np.asarray(predict(x), dtype=np.float32)
        if several:
            p, y, real, x = (multihost.gather(acc, a) for a in (p, y, real, x))
        y_true = np.argmax(y[real], axis=-1)
        probs.append(p[real])
        labels.append(y_true)
        samples.add(x[real], y_true, p[real])
    if not probs or not acc.chief:
        return
    probs_all, y_true = np.concatenate(probs), np.concatenate(labels)
    y_pred = probs_all.argmax(-1)
    metrics["val_accuracy_best_weights"] = float((y_pred == y_true).mean())
    plots.plot_confusion_matrix(y_true, y_pred, names, run.file("confusion_matrix.png"))
    samples.plot(names, run.file("sample_predictions.png"))
