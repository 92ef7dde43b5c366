"""The Keras callbacks of ``train()``: the epoch commits to the run folder, the time
budget, the validation loss without padding rows, and progress lines.

Each one keeps a promise of ``train()``: completed epochs (and only those) reach the
disk at least every minute and whenever a fit ends, a Kaggle session ends with a
loadable checkpoint instead of a killed kernel, metrics count real images only, and
a log stays readable in a notebook and in a committed kernel's output alike.
"""

from __future__ import annotations

import contextlib
import sys
import time

import keras
import numpy as np

from shopee_tpu.data.read import pipeline
from shopee_tpu.models import make_schedule
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training.state import RunState
from shopee_tpu.training.time_plan import GUARD_MARGIN, FitToTime

__all__ = [
    "EpochCommit",
    "TimeBudget",
    "UnpaddedValidationLoss",
    "Progress",
    "training_callbacks",
]


class EpochCommit(keras.callbacks.Callback):
    """Commits completed epochs to the run folder (weights, optimizer, history).

    A commit writes the weights with the optimizer state (about 2-3 s for a small
    EfficientNet on 2 CPU cores), a large share of an epoch of a few seconds. So an
    epoch is committed once ``every`` seconds have passed since the last commit,
    when it is the new best by ``monitor`` (its weights would be lost otherwise),
    and when it ends the ``fit`` (the run's or a phase's last epoch, or a stop
    asked by a callback before this one, such as ``TimeBudget``): after its last
    epoch ``fit`` replaces the weights with their EMA, so nothing can be committed
    later. The epochs in between join the history at the next commit. A crash
    loses at most ``every`` seconds of training; ``every=0`` commits each epoch.
    """

    def __init__(
        self,
        folder: RunFolder,
        steps: int,
        global_batch: int,
        schedule,
        *,
        write,
        ema=None,
        monitor: str | None = "val_accuracy",
        every: float = 0.0,
        agree=None,
    ):
        super().__init__()
        self.folder, self.steps, self.global_batch = folder, steps, global_batch
        self.schedule, self.write, self.ema = schedule, write, ema
        self.monitor, self.every = monitor, every
        # Every process must save at the same epoch: the chief's clock decides.
        self.agree = agree or (lambda flag: flag)
        self.pending: list[dict] = []  # rows of completed, uncommitted epochs
        self.longest_commit = 0.0  # seconds (what the final commit may take)
        # The phase's side (progressive resizing): set by train() for a model with
        # an open input side; else the model's own.
        self.image_size: int | None = None

    @contextlib.contextmanager
    def _ema_weights(self):
        # SwapEMAWeights' own hooks put the EMA weights in for evaluation and take
        # them out after, as around the validation pass just run.
        self.ema.on_test_begin()
        try:
            yield
        finally:
            self.ema.on_test_end()

    def on_train_begin(self, logs=None):
        self.last_commit = time.monotonic()
        self.pending = []

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
            # Stopped mid-epoch (time budget): this epoch is not complete, and the
            # weights have moved past any uncommitted epochs before it.
            return
        now = time.monotonic()
        row = self._row(epoch, logs or {}, now)
        self.pending.append(row)
        improved = self.monitor is not None and self.folder.improves(row, self.monitor)
        due = now - self.last_commit >= self.every
        ending = self.model.stop_training or epoch + 1 >= self.params["epochs"]
        if self.agree(float(improved or due or ending)):
            self.commit_pending()

    def _row(self, epoch: int, logs: dict, now: float) -> dict:
        train_time = (self.t_train or now) - self.t0
        iterations = int(np.asarray(self.model.optimizer.iterations))
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in logs.items()})
        row.update(
            lr=float(np.asarray(self.schedule(iterations - 1)))
            if callable(self.schedule)
            else float(self.schedule),
            iterations=iterations,
            image_size=int(self.image_size or self.model.input_shape[1]),
            images_per_sec=round(
                self.steps * self.global_batch / max(train_time, 1e-9), 2
            ),
            epoch_time_sec=round(now - self.t0, 2),
        )
        return row

    def commit_pending(self) -> None:
        """Commits the newest uncommitted epoch (with the ones before it)."""
        began = time.monotonic()
        *earlier, row = self.pending
        self.folder.commit_epoch(
            self.model,
            row["epoch"],
            row,
            monitor=self.monitor,
            write=self.write,
            evaluated_weights=self._ema_weights if self.ema is not None else None,
            earlier=earlier,
        )
        self.pending, self.last_commit = [], time.monotonic()
        self.longest_commit = max(self.longest_commit, self.last_commit - began)


class TimeBudget(keras.callbacks.Callback):
    """Stops before the session limit.

    After each epoch it stops when the next epoch (as long as the longest so far)
    would not fit before the limit, less ``reserve()``: what follows the last
    epoch (``FitToTime``, which plans a run to end before this guard). The first
    epoch of each ``fit`` (each phase) also traces the model, at several times a
    steady epoch's cost on CPU, so it counts only until a steady epoch has been
    seen. Mid-epoch it stops only once the limit has passed
    and an earlier epoch is already committed, so the partial epoch is dropped and
    the checkpoint is kept; the first epoch always finishes, else nothing would be
    saved at all. Mid-epoch it looks at the clock about every ``CHECK_EVERY``
    seconds, so it may stop that much after the limit. Place it before
    ``EpochCommit``, which commits the epoch it stops at; an epoch is timed from
    the end of the one before, so a commit counts in the next epoch's time.
    """

    # Seconds between mid-epoch checks of the limit. On several hosts a check is a
    # broadcast from the chief, which every host must join: at every step it
    # would cost a collective per step.
    CHECK_EVERY = 5.0

    def __init__(
        self,
        folder: RunFolder,
        start: float,
        limit: float | None,
        agree=None,
        reserve=lambda: 0.0,
    ):
        super().__init__()
        self.folder, self.start, self.limit, self.reason = folder, start, limit, None
        # Seconds kept for what follows the last epoch (``FitToTime.reserve``).
        self.reserve = reserve
        self.steady = self.first = 0.0  # longest steady / first (traced) epoch
        self.traced = False  # the current fit has traced its first epoch
        # Several processes must stop at the same step: the chief's clock decides.
        self.agree = agree or (lambda flag: flag)

    @property
    def longest(self) -> float:
        """The next epoch's expected length."""
        return self.steady or self.first

    def on_train_begin(self, logs=None):
        self.traced = False
        self.t0 = self.checked = time.monotonic()
        self.steps = self.next_check = self.checked_step = 0

    def on_train_batch_end(self, batch, logs=None):
        if self.limit is None or self.model.stop_training:
            return
        self.steps += 1
        if self.steps < self.next_check:
            return
        now = time.monotonic()
        over = now - self.start > self.limit and self.folder.epoch > 0
        # The chief also says when to check next, in steps from its pace: every
        # host must join the same broadcasts, so none may go by its own clock.
        per_step = (now - self.checked) / (self.steps - self.checked_step)
        wait = max(1, int(self.CHECK_EVERY / max(per_step, 1e-6)))
        self.checked, self.checked_step = now, self.steps
        answer = self.agree(-1.0 if over else float(wait))
        if answer < 0:
            self.model.stop_training = True
            self.reason = f"time limit {self.limit:.0f}s reached mid-epoch; kept epoch {self.folder.epoch}"
        else:
            self.next_check = self.steps + int(answer)

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        took, self.t0 = now - self.t0, now
        if self.traced:
            self.steady = max(self.steady, took)
        else:
            self.first, self.traced = max(self.first, took), True
        if self.limit is None or self.reason or self.model.stop_training:
            return  # (a planned end, or the phase's: FitToTime)
        elapsed = time.monotonic() - self.start
        limit = self.limit - self.reserve()
        if self.agree(float(elapsed + GUARD_MARGIN * self.longest > limit)):
            self.model.stop_training = True
            self.reason = (
                f"time limit {self.limit:.0f}s: {elapsed:.0f}s used, the next epoch "
                f"needs about {self.longest:.0f}s"
            )


class UnpaddedValidationLoss(keras.callbacks.Callback):
    """Rescales ``val_loss`` to a mean over the real validation records.

    Validation batches are padded to full size with rows of sample weight 0.
    Accuracy weighs by sample weight, so it is exact; Keras's loss tracker divides
    each batch's weighted sum by the batch size, padding included, so its mean is
    the real mean times ``real / padded``. ``padded_per_real`` undoes that.
    """

    def __init__(self, padded_per_real: float):
        super().__init__()
        self.factor = padded_per_real

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_loss" in logs:
            logs["val_loss"] = float(logs["val_loss"]) * self.factor


class Progress(keras.callbacks.Callback):
    """A tqdm bar per epoch with loss and accuracy (works in notebooks and logs)."""

    def __init__(self, epochs: int, steps: int):
        super().__init__()
        self.epochs, self.steps = epochs, steps

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm.auto import tqdm

        # In logs (Kaggle's committed runs, CI) redraw rarely instead of per step.
        interval = 0.1 if sys.stderr.isatty() or in_notebook() else 30.0
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


class CommitWhenStopped(keras.callbacks.Callback):
    """Commits the epoch a callback after ``EpochCommit`` stopped training at."""

    def __init__(self, commit: EpochCommit):
        super().__init__()
        self.commit = commit

    def on_epoch_end(self, epoch, logs=None):
        stopped = self.commit.agree(float(bool(self.model.stop_training)))
        if stopped and self.commit.pending:
            self.commit.commit_pending()


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def training_callbacks(
    run: RunState,
    time_limit: float | None,
    checkpoint_every: float,
    extra: list = (),
    plan: tuple = (None, 0),
):
    """The callbacks of a run's fits (``shopee_tpu.training.loop``), in order, with
    the user's ``extra`` ones after ours: ``(callbacks, budget, commit, plan)``;
    ``plan`` is ``(seconds to fit the run into, images predicted after it)``.

    EMA weights are swapped in for validation only; the commit saves the raw weights
    as ``last`` (they belong with the optimizer state) and the EMA weights, which
    were scored, as ``best``. The time plan and then the budget decide before the
    commit, which then saves the epoch they stop at.
    """
    cfg, acc = run.config, run.acc
    global_batch = acc.batch_size(cfg.batch_size)
    # The same pure function the optimizer uses, for the history's LR column.
    schedule = make_schedule(cfg.optim, run.steps, cfg.epochs, acc.replicas)
    swapper = keras.callbacks.SwapEMAWeights() if cfg.optim.ema else None
    commit = EpochCommit(
        run.folder,
        run.steps,
        global_batch,
        schedule,
        write=acc.chief,
        ema=swapper,
        monitor="val_accuracy" if run.validate else None,
        every=checkpoint_every,
        agree=acc.from_chief,
    )
    progress = Progress(cfg.epochs, run.steps) if run.verbose else None

    def planned(epochs: int) -> None:
        commit.schedule = make_schedule(cfg.optim, run.steps, epochs, acc.replicas)
        if progress is not None:
            progress.epochs = epochs

    fit_within, predict_images = plan
    plan = FitToTime(
        run,
        fit_within,
        predict_images=predict_images,
        agree=acc.from_chief,
        commit_seconds=lambda: commit.longest_commit,
        on_plan=planned,
    )
    budget = TimeBudget(
        run.folder,
        run.start,
        time_limit,
        agree=acc.from_chief,
        reserve=lambda: plan.reserve,
    )
    valid_rows = 0
    if run.validate:
        batches = pipeline.eval_batches(
            run.records.valid,
            acc.host_batch_size(cfg.batch_size),
            acc.num_workers,
            run.records.valid_ids,
        )
        valid_rows = global_batch * batches
    callbacks = [UnpaddedValidationLoss(valid_rows / max(1, run.n_valid)), plan]
    callbacks = ([swapper] if swapper else []) + callbacks + [budget, commit]
    if progress is not None:
        callbacks.append(progress)
    if extra:
        # A user's callback may stop training after our commit has passed on the
        # epoch; it must still be committed before `fit` ends (and swaps in the
        # EMA weights).
        built = [c if isinstance(c, keras.callbacks.Callback) else c() for c in extra]
        callbacks += [*built, CommitWhenStopped(commit)]
    return callbacks, budget, commit, plan
