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

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopee_tpu.checkpoints import RunFolder
from shopee_tpu.config import RunConfig
from shopee_tpu.utils import atomic_write_text

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
    device: str | None = None,
    accelerator=None,
    verbose: int | None = None,
) -> TrainResult:
    """Trains (or resumes) the run described by ``config``.

    Args:
        config: The run config; ``config.data.train`` names the training records.
        out_dir: Run folder; defaults to ``config.out_dir``.
        time_limit: Seconds of wall time this call may use (``--time-limit 8h45m``).
            Training stops after the last epoch that fits, with its checkpoint.
        device: Overrides ``config.device`` for ``connect()``.
        accelerator: An ``Accelerator`` from ``shopee_tpu.connect()`` to reuse.
        verbose: 1 shows progress bars, 0 is silent; ``None`` picks 1.

    Returns:
        A ``TrainResult``.

    Raises:
        ConfigMismatch: ``out_dir`` holds a run trained with a different config.
        ValueError: ``config.data.train`` is unset or holds no records.
    """
    import keras

    from shopee_tpu.accelerator import connect
    from shopee_tpu.data import pipeline
    from shopee_tpu.models import (
        build_from_config,
        compile_model,
        input_spec,
        make_schedule,
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
    chief = acc.worker_index == 0
    run = RunFolder(out_dir)
    run.check_config(config)
    keras.utils.set_random_seed(config.seed)

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
    if config.data.valid:
        train_files, valid_files = files, pipeline.list_files(config.data.valid)
    elif (manifest or {}).get("valid"):
        # Records that carry their own split (`shopee-tpu cdiscount prepare`).
        valid_dir = os.path.join(os.path.dirname(files[0]), manifest["valid"])
        train_files, valid_files = files, pipeline.list_files(valid_dir)
    else:
        train_files, valid_files = pipeline.holdout_files(
            files, config.data.valid_fraction, config.seed
        )
    if chief:
        atomic_write_text(
            run.file("label_map.json"), json.dumps(label_map, indent=1) + "\n"
        )

    image_size = config.data.image_size or input_spec(config.model.backbone).size
    global_batch = acc.batch_size(config.batch_size)
    n_train = pipeline.count_records(train_files)
    n_valid = pipeline.count_records(valid_files)
    steps = config.steps_per_epoch or max(1, n_train // global_batch)
    common = dict(
        schema=config.data.schema,
        image_size=image_size,
        batch_size=global_batch,
        num_classes=num_classes,
        num_workers=acc.num_workers,
        worker_index=acc.worker_index,
    )
    train_ds = pipeline.load_dataset(
        train_files,
        training=True,
        augment=config.augment,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        **common,
    )
    valid_ds = pipeline.load_dataset(
        valid_files, training=False, labels=True, cache=config.data.cache, **common
    )

    with acc.scope():
        model = build_from_config(config.model, num_classes, image_size=image_size)
        compile_model(
            model,
            config.optim,
            steps_per_epoch=steps,
            epochs=config.epochs,
            replicas=acc.replicas,
        )
        if run.epoch > 0:
            run.restore(model)

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
        budget = _TimeBudget(run, start, time_limit)
        # EMA weights are swapped in for validation only; the commit saves the raw
        # weights as `last` (they belong with the optimizer state) and the EMA
        # weights, which were scored, as `best`.
        swapper = keras.callbacks.SwapEMAWeights() if config.optim.ema else None
        callbacks = [
            _EpochCommit(run, steps, global_batch, schedule, write=chief, ema=swapper),
            budget,
        ]
        if swapper is not None:
            callbacks.insert(0, swapper)
        if verbose:
            callbacks.append(_Progress(config.epochs, steps))
        model.fit(
            train_ds,
            epochs=config.epochs,
            initial_epoch=done,
            steps_per_epoch=steps,
            validation_data=valid_ds,
            callbacks=callbacks,
            verbose=0,
        )
        stop_reason = budget.reason
    finished = run.epoch >= config.epochs
    if chief:
        run.mark_finished(finished, stop_reason=stop_reason)

    if run.exists(RunFolder.BEST):
        run.restore(model, optimizer=False, which=RunFolder.BEST)
    metrics = _final_metrics(run, config, acc, n_train, n_valid, start, stop_reason)
    if chief:
        _report(run, model, valid_ds, schedule, steps, config, label_map, metrics)
        atomic_write_text(
            run.file("metrics.json"), json.dumps(metrics, indent=1) + "\n"
        )
    if verbose:
        how_far = f"{run.epoch}/{config.epochs} epochs"
        note = f" (stopped: {stop_reason})" if stop_reason else ""
        print(
            f"{out_dir}: {how_far}{note}; best val accuracy {metrics['best_val_accuracy']}"
        )
    return TrainResult(model, metrics, run.history, out_dir, label_map)


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


def _report(run, model, valid_ds, schedule, steps, config, label_map, metrics) -> None:
    """Plots into the run folder and adds validation figures to ``metrics``."""
    from shopee_tpu import plots

    names = class_names(label_map)
    if run.history:
        plots.plot_history(run.history, run.file("history.png"))
    plots.plot_lr_schedule(
        schedule,
        steps * config.epochs,
        run.file("lr_schedule.png"),
        steps_per_epoch=steps,
    )
    images, labels, probs = [], [], []
    for x, y in valid_ds:
        p = model.predict_on_batch(x)
        probs.append(np.asarray(p, dtype=np.float32))
        labels.append(np.argmax(np.asarray(y), axis=-1))
        if sum(len(i) for i in images) < 16:
            images.append(np.asarray(x))
    if not probs:
        return
    probs_all, y_true = np.concatenate(probs), np.concatenate(labels)
    y_pred = probs_all.argmax(-1)
    metrics["val_accuracy_best_weights"] = float((y_pred == y_true).mean())
    plots.plot_confusion_matrix(y_true, y_pred, names, run.file("confusion_matrix.png"))
    plots.plot_predictions(
        np.concatenate(images)[:16],
        y_true[:16],
        probs_all[:16],
        names,
        run.file("sample_predictions.png"),
    )


def _import_callback_base():
    import keras

    return keras.callbacks.Callback


class _EpochCommit(_import_callback_base()):
    """Commits each completed epoch to the run folder (weights, optimizer, history)."""

    def __init__(
        self,
        run: RunFolder,
        steps: int,
        global_batch: int,
        schedule,
        *,
        write,
        ema=None,
    ):
        super().__init__()
        self.run, self.steps, self.global_batch = run, steps, global_batch
        self.schedule, self.write, self.ema = schedule, write, ema

    @contextlib.contextmanager
    def _ema_weights(self):
        self.ema._swap_variables()
        try:
            yield
        finally:
            self.ema._swap_variables()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.monotonic()
        self.t_train = None
        self.steps_done = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done = batch + 1

    def on_test_begin(self, logs=None):
        self.t_train = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.steps_done < self.steps:
            return  # stopped mid-epoch (time budget): this epoch is not complete
        now = time.monotonic()
        train_time = (self.t_train or now) - self.t0
        iterations = int(np.asarray(self.model.optimizer.iterations))
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row.update(
            lr=float(np.asarray(self.schedule(iterations - 1)))
            if callable(self.schedule)
            else float(self.schedule),
            iterations=iterations,
            images_per_sec=round(
                self.steps * self.global_batch / max(train_time, 1e-9), 2
            ),
            epoch_time_sec=round(now - self.t0, 2),
        )
        self.run.commit_epoch(
            self.model,
            epoch + 1,
            row,
            monitor="val_accuracy",
            write=self.write,
            evaluated_weights=self._ema_weights if self.ema is not None else None,
        )


class _TimeBudget(_import_callback_base()):
    """Stops before the session limit.

    After each epoch it stops when the next epoch (as long as the longest so far)
    would not fit. Mid-epoch it stops only once the limit has passed and an earlier
    epoch is already committed, so the partial epoch is dropped and the checkpoint
    is kept; the first epoch always finishes, else nothing would be saved at all.
    """

    def __init__(self, run: RunFolder, start: float, limit: float | None):
        super().__init__()
        self.run, self.start, self.limit, self.reason = run, start, limit, None
        self.longest = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        over = self.limit is not None and time.monotonic() - self.start > self.limit
        if over and self.run.epoch > 0 and not self.model.stop_training:
            self.model.stop_training = True
            self.reason = f"time limit {self.limit:.0f}s reached mid-epoch; kept epoch {self.run.epoch}"

    def on_epoch_end(self, epoch, logs=None):
        self.longest = max(self.longest, time.monotonic() - self.t0)
        if self.limit is None or self.reason:
            return
        elapsed = time.monotonic() - self.start
        if elapsed + 1.1 * self.longest > self.limit:
            self.model.stop_training = True
            self.reason = (
                f"time limit {self.limit:.0f}s: {elapsed:.0f}s used, the next epoch "
                f"needs about {self.longest:.0f}s"
            )


class _Progress(_import_callback_base()):
    """A tqdm bar per epoch with loss and accuracy (works in notebooks and logs)."""

    def __init__(self, epochs: int, steps: int):
        super().__init__()
        self.epochs, self.steps = epochs, steps

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm.auto import tqdm

        # In logs (Kaggle's committed runs, CI) redraw rarely instead of per step.
        interval = 0.1 if sys.stderr.isatty() or _in_notebook() else 30.0
        self.bar = tqdm(
            total=self.steps,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            leave=True,
            mininterval=interval,
        )
        self.last = 0

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(batch + 1 - self.last)
        self.last = batch + 1
        if logs:
            self.bar.set_postfix(
                {k: f"{float(v):.4f}" for k, v in logs.items()}, refresh=False
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs:
            self.bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items()})
        self.bar.close()


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules
