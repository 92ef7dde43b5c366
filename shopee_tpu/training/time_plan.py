"""A time limit plans the schedule to fit.

With ``train(config, time_limit=T)`` the run used to stop before an epoch that
would not fit, its learning-rate schedule still planned for every epoch asked
for: a cosine cut at epoch 6 of 8 ends at a high rate, and the last epochs it
trained were spent at rates meant for the middle of a run. Instead:

* at the end of the first steady epoch (the first epoch of each ``fit`` also
  traces the step, so it says little about the next), the chief measures it,
  estimates the work after the last epoch (``AfterTraining``: the final commit,
  the report, the prediction the caller announced) and plans the most epochs,
  up to ``config.epochs``, that fit in what is left of ``T``;
* the plan moves the end of the cosine, an optimizer variable
  (``shopee_tpu.models.optim.planned_steps``) that the compiled step reads at
  its next call: no retrace, on TensorFlow and JAX alike;
* every later steady epoch checks the plan against the latest epoch times and
  plans fewer epochs when the rest would overrun; never more, since moving the
  end of a cosine further out would raise the rate again;
* the plan is committed with the next epoch (``RunFolder.planned_epochs``), so a
  killed run resumes on the same schedule;
* on several processes the chief's clock decides and every process takes its
  count (``Accelerator.from_chief``), at the same epoch.

Progressive resizing and a frozen warm-up are planned too: an epoch at another
size is estimated from the measured one by pixel count, and the phases are cut
again for the planned count (never back to a smaller size or a frozen
backbone). ``TimeBudget`` stays the last guard, with the same reserve.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras

from shopee_tpu.models.optim import planned_steps
from shopee_tpu.training.plan import Phase, phase_at, plan_phases
from shopee_tpu.training.state import RunState

__all__ = ["AfterTraining", "FitToTime", "epochs_that_fit"]

# A forward pass is about a third of a training step's arithmetic; half is what
# is assumed for the caller's prediction when no validation pass was timed.
FORWARD_SPEEDUP = 2.0
# Tracing the prediction step costs at most about half of what tracing the
# training step added to the first epoch.
PREDICT_TRACE_SHARE = 0.5
# TimeBudget's estimate of the next epoch: the longest so far, times this.
GUARD_MARGIN = 1.1
# The report after training (plots, metrics.json), on a slow 2-core machine.
REPORT_SECONDS = 5.0


def epochs_that_fit(
    plan,
    image_size: int,
    *,
    done: int,
    most: int,
    available: float,
    seconds: Callable[[Phase], float],
    current: Phase,
    longest: Callable[[Phase], float] | None = None,
) -> int:
    """The most epochs, ``done`` to ``most``, whose remaining epochs fit.

    The last epoch must also pass ``TimeBudget``'s test, which expects an epoch
    to take up to 1.1 times the longest so far (``longest``; default
    ``seconds``), or the guard would cut the plan's last epoch.

    Args:
        plan: The run's ``PlanConfig`` (phases are cut again for each count).
        image_size: The full image size.
        done: Epochs completed.
        most: The epochs asked for.
        available: Seconds for the remaining epochs.
        seconds: The expected length of one epoch of a phase.
        current: The phase training now: a plan never goes back to a smaller
            size or to a frozen backbone.
    """
    best = done
    for total in range(done + 1, most + 1):
        phases = plan_phases(plan, total, image_size)
        upcoming = phase_at(phases, done)
        if upcoming.image_size < current.image_size or (
            upcoming.frozen and not current.frozen
        ):
            continue
        need = sum(seconds(phase_at(phases, e)) for e in range(done, total - 1))
        need += GUARD_MARGIN * (longest or seconds)(phase_at(phases, total - 1))
        if need <= available:
            best = total
    return best


@dataclass
class AfterTraining:
    """What follows the last epoch, estimated from what training measured."""

    commit: float = 0.0  # the final commit: as long as the longest so far
    report: float = REPORT_SECONDS  # plots and metrics, plus the validation pass
    predict: float = 0.0  # the caller's prediction (``predict_images``)

    @property
    def seconds(self) -> float:
        return self.commit + self.report + self.predict


class FitToTime(keras.callbacks.Callback):
    """Plans the epoch count, and with it the end of the schedule, to fit the
    time limit (see the module docstring). Place it before ``EpochCommit``,
    which commits the epoch it stops at.

    Args:
        run: The run's state; its ``config.epochs`` and ``phases`` follow
            the plan.
        limit: Seconds from ``run.start``; ``None`` plans nothing.
        predict_images: Images the caller predicts after training, each in
            every view of ``config.predict.tta``.
        agree: The chief's value on every process.
        on_plan: Called with the new epoch count (the history's schedule, the
            progress bars).
    """

    def __init__(
        self,
        run: RunState,
        limit: float | None,
        *,
        predict_images: int = 0,
        agree=None,
        commit_seconds: Callable[[], float] = lambda: 0.0,
        on_plan: Callable[[int], None] = lambda epochs: None,
    ):
        super().__init__()
        self.run, self.limit, self.predict_images = run, limit, predict_images
        self.agree = agree or (lambda value: value)
        self.commit_seconds, self.on_plan = commit_seconds, on_plan
        self.asked = run.config.epochs
        self.planned = run.folder.planned_epochs is not None
        self.phase: Phase = run.phases[0]  # the fit's phase: set by the loop
        self.switch_at: int | None = None  # ended the fit for the next phase
        self.steady: list[float] = []  # epochs of this phase, after the traced one
        self.first = self.eval_seconds = self.train_seconds = 0.0
        self.after = AfterTraining()

    @property
    def reserve(self) -> float:
        """Seconds kept for what follows the last epoch."""
        return self.after.seconds if self.limit is not None else 0.0

    def on_train_begin(self, logs=None):
        self.t0, self.traced, self.steady = time.monotonic(), False, []

    def on_epoch_begin(self, epoch, logs=None):
        self.t_epoch, self.t_eval = time.monotonic(), None

    def on_test_begin(self, logs=None):
        self.t_eval = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        took, self.t0 = now - self.t0, now
        self.train_seconds = (self.t_eval or now) - self.t_epoch
        self.eval_seconds = now - self.t_eval if self.t_eval else 0.0
        if not self.traced:
            self.traced, self.first = True, max(self.first, took)
        else:
            self.steady.append(took)
        if self.limit is None or self.model.stop_training:
            return
        done = epoch + 1
        self.after = self._after()
        if self.steady:
            total = self.agree(float(self._fitting(done, now)))
            self._apply(int(round(total)), done)
        self._stop_for_next_phase(done)

    def _epoch_seconds(self) -> float:
        # The median of the latest three: one slow epoch (another job, a commit
        # to a slow disk) does not shrink the plan on its own.
        return statistics.median(self.steady[-3:])

    def _fitting(self, done: int, now: float) -> int:
        """The most epochs that fit (the chief's answer is the one used)."""
        run = self.run
        available = self.limit - (now - run.start) - self.after.seconds
        steady, size = self._epoch_seconds(), self.phase.image_size
        slowest = max(self.steady)
        total = epochs_that_fit(
            run.config.plan,
            run.image_size,
            done=done,
            most=run.config.epochs if self.planned else self.asked,
            available=available,
            seconds=lambda p: steady * (p.image_size / size) ** 2,
            current=self.phase,
            longest=lambda p: slowest * (p.image_size / size) ** 2,
        )
        return max(total, done)

    def _after(self) -> AfterTraining:
        """The work after the last epoch, from this epoch's measurements."""
        run, steady = self.run, self._epoch_seconds() if self.steady else self.first
        train_rate = run.steps * run.acc.batch_size(run.config.batch_size)
        train_rate /= max(self.train_seconds, 1e-6)
        report = REPORT_SECONDS
        if self.eval_seconds and run.n_valid:
            forward_rate = run.n_valid / self.eval_seconds
            report += self.eval_seconds
        else:
            forward_rate = FORWARD_SPEEDUP * train_rate
        predict = 0.0
        if self.predict_images:
            views = max(1, len(run.config.predict.tta))
            predict = self.predict_images * views / forward_rate
            predict += PREDICT_TRACE_SHARE * max(0.0, self.first - steady)
        return AfterTraining(self.commit_seconds(), report, predict)

    def _apply(self, total: int, done: int) -> None:
        """Makes ``total`` the run's epoch count when it differs."""
        run = self.run
        if total == run.config.epochs and self.planned:
            return
        self.planned = True
        run.config = run.config.replace(epochs=total)
        run.phases = plan_phases(run.config.plan, total, run.image_size)
        run.folder.plan_epochs(total)  # committed with the next epoch
        variable = planned_steps(self.model.optimizer)
        if variable is not None:
            variable.assign(float(total * run.steps))
        self.on_plan(total)
        run.say(
            f"time limit: {total} epochs of {self.asked} fit (an epoch takes "
            f"{self._epoch_seconds():.0f}s, {self.after.seconds:.0f}s kept for what "
            "follows); the schedule ends with them"
        )

    def _stop_for_next_phase(self, done: int) -> None:
        """Ends the fit at the planned end, or where the planned phases need
        another model (a new size or trainable set)."""
        run = self.run
        if done >= run.config.epochs:
            self.model.stop_training = True
            return
        upcoming = phase_at(run.phases, done)
        now = (self.phase.image_size, self.phase.frozen)
        if (upcoming.image_size, upcoming.frozen) != now:
            self.model.stop_training, self.switch_at = True, done
