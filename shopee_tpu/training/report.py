"""What a finished (or stopped) run reports: ``metrics.json``'s figures, warnings
about a validation split that cannot be trusted, and the plots in the run folder
(history, learning-rate schedule, confusion matrix, sample predictions).

The validation predictions behind the confusion matrix are split over the devices,
as ``fit`` splits its batches; on several JAX hosts every host feeds its part of
the records, gets every host's predictions back (``inference.hosts``),
and the chief writes.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from shopee_tpu import plots
from shopee_tpu.data.read.augment import needs_mixing
from shopee_tpu.data.write.sources import class_names
from shopee_tpu.inference.hosts import hosts_call
from shopee_tpu.inference.tta import tta_step
from shopee_tpu.models import make_schedule
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training.checks import validation_warnings
from shopee_tpu.training.state import RunState

__all__ = ["final_metrics", "report"]


def final_metrics(
    run: RunState, folder: RunFolder, stop_reason: str | None, finished: bool
) -> dict:
    """``metrics.json`` of a run."""
    cfg, acc = run.config, run.acc
    history = folder.history
    best = folder.state.get("best") or {}
    last = history[-1] if history else {}
    rates = [r["images_per_sec"] for r in history if r.get("images_per_sec")]
    metrics = {
        "epochs_completed": folder.epoch,
        "epochs": cfg.epochs,
        # More than "epochs" when a time limit planned fewer (training.time_plan).
        "epochs_asked": run.asked_epochs or cfg.epochs,
        "finished": finished,
        "stop_reason": stop_reason,
        "final_val_accuracy": last.get("val_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "best_val_accuracy": best.get("value"),
        "best_epoch": best.get("epoch"),
        "images_per_sec": float(np.median(rates)) if rates else None,
        "wall_time_sec": round(time.monotonic() - run.start, 2),
        "train_images": run.n_train,
        "valid_images": run.n_valid,
        "replicas": acc.replicas,
        "device": acc.kind,
        "backend": acc.backend,
        "steps_per_epoch": run.steps,
        "steps_per_execution": run.per_call,
        "hosts": acc.num_workers,
    }
    found = validation_warnings(history, mixing=needs_mixing(cfg.augment))
    for message in found:
        warnings.warn(message, stacklevel=4)
    metrics["validation_warnings"] = found
    return metrics


def report(run: RunState, folder: RunFolder, model, valid_ds, metrics: dict) -> None:
    """Plots into the run folder and adds ``val_accuracy_best_weights``."""
    cfg, acc = run.config, run.acc
    if acc.chief:
        if folder.history:
            plots.plot_history(folder.history, folder.file("history.png"))
        schedule = make_schedule(cfg.optim, run.steps, cfg.epochs, acc.replicas)
        plots.plot_lr_schedule(
            schedule,
            run.steps * cfg.epochs,
            folder.file("lr_schedule.png"),
            steps_per_epoch=run.steps,
        )
    if valid_ds is None:
        return
    labels, probs, samples = _predict_validation(model, valid_ds, acc)
    if not acc.chief:
        return
    y_pred = probs.argmax(-1)
    metrics["val_accuracy_best_weights"] = float((y_pred == labels).mean())
    names = class_names(run.label_map)
    plots.plot_confusion_matrix(
        labels, y_pred, names, folder.file("confusion_matrix.png")
    )
    samples.plot(names, folder.file("sample_predictions.png"))


def _predict_validation(model, valid_ds, acc):
    """``(labels, probabilities, sample grid)`` of the real (unpadded) validation
    records: every host's on each host; the samples come from this host's rows."""
    several = acc.backend == "jax" and acc.num_workers > 1
    predict = _hosts_predict(model, acc) if several else _local_predict(model)
    labels, probs = [], []
    samples = plots.PredictionSamples(16)
    for x, y, weight in valid_ds:
        x, y = np.asarray(x), np.asarray(y)
        real = np.asarray(weight) > 0  # padding rows complete the last batch only
        p, y_all, real_all, own = predict(x, y, real)
        labels.append(np.argmax(y_all[real_all], axis=-1))
        probs.append(p[real_all])
        samples.add(x[real], np.argmax(y[real], axis=-1), own[real])
    return np.concatenate(labels), np.concatenate(probs), samples


def _local_predict(model):
    one_view = tta_step(model, "identity")

    def predict(x, y, real):
        p = np.asarray(one_view(x)[:, 0], np.float32)
        return p, y, real, p

    return predict


def _hosts_predict(model, acc):
    """Several JAX hosts: each feeds its own validation rows, as ``fit`` did, and
    gets every host's rows back with their labels (``hosts_call``)."""
    call = hosts_call(model)

    def predict(x, y, real):
        b = len(x)
        # Each row's host and place ride along, to find this host's own rows.
        where = np.arange(b, dtype=np.int32) + acc.worker_index * b
        p, y_all, real_all, where = call(x, y, real, where, host_rows=True)
        p = np.asarray(p[:, 0], np.float32)
        mine = np.flatnonzero(where // b == acc.worker_index)
        own = p[mine[np.argsort(where[mine])]]
        return p, y_all, real_all, own

    return predict
