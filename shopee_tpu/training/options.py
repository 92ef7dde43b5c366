"""How one call trains, apart from what it trains: the keyword options of
``train()``, documented here once.

The config (and the run folder, and a fold's records) say what a run is; these
options say how this call goes about it: how long it may take, how often it
commits, where it runs, what it prints, which callbacks of yours it runs. A rerun
with other options resumes the same run. ``train_folds``, ``run_sweep`` and
``tune`` take the same ``TrainOptions`` and pass them on to each of their runs;
``SingleRunOptions`` adds what only a single ``train()`` call has.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TypedDict

from shopee_tpu.accelerator import Accelerator, connect_for

__all__ = [
    "SingleRunOptions",
    "TrainOptions",
    "accelerator_for",
    "check_options",
    "time_left",
    "verbosity",
]


class TrainOptions(TypedDict, total=False):
    """The options of a training call (``train``, ``train_folds``, ``run_sweep``,
    ``tune``), each a keyword argument that may be left out.

    Attributes:
        time_limit: Seconds of wall time this call may use (``--time-limit
            8h45m``); ``None`` (the default): no limit. A ``train()`` call fits
            its run to it (unless ``fit_to_time=False``): after the first steady
            epoch the run plans the most epochs (up to ``config.epochs``) that
            fit, with what follows them, and its cosine schedule ends with the
            last of them (``shopee_tpu.training.time_plan``). Should the epochs
            slow down, it plans fewer, and as a last guard it stops after the
            last epoch that fits, with its checkpoint. K-fold runs, sweeps and
            ``tune`` share the limit among their runs, which it only stops: a
            rerun continues the run it stopped, and the runs not started yet.
        checkpoint_every: Seconds of training between checkpoints (default 60):
            an epoch is committed once this much time has passed since the last
            commit, when it is the best so far, and at the end of each fit
            (phase, run, time limit). A crash loses at most this much; 0 commits
            every epoch.
        device: Overrides ``config.device`` for ``connect()``.
        accelerator: An ``Accelerator`` from ``shopee_tpu.connect()`` to reuse.
        verbose: 1 shows progress bars, 0 is silent; ``None`` (the default)
            picks 1.
        callbacks: Your own Keras callbacks (TensorBoard, EarlyStopping, a
            logger), or functions that return one (called once Keras runs on the
            backend ``connect()`` chose), run after ours in every ``fit`` of
            every run: the epoch is committed to the run folder before they see
            it. A callback that stops training (``EarlyStopping``) ends the run
            as a finished run: its last epoch is committed, and a rerun does not
            train again.
    """

    time_limit: float | None
    checkpoint_every: float
    device: str | None
    accelerator: Accelerator | None
    verbose: int | None
    callbacks: list | None


class SingleRunOptions(TrainOptions, total=False):
    """Every option of ``TrainOptions``, and those of a single run's
    ``train()`` call (not of the runs of a k-fold run, a sweep or ``tune``).

    Attributes:
        resume_stopped: Train on past a finished run that a callback stopped
            early, from its last committed epoch up to ``config.epochs``
            (default ``False``).
        predict_images: Images you predict right after this call (each in every
            view of ``config.predict.tta``); a time limit keeps time for them
            (default 0).
        fit_to_time: ``False``: the time limit only stops the run, which resumes
            in the next call with every epoch asked (a run spread over several
            sessions; ``--resume-later``). Default ``True``.
    """

    resume_stopped: bool
    predict_images: int
    fit_to_time: bool


def check_options(function: str, options: Mapping, kind: type = TrainOptions) -> None:
    """Refuses an option ``kind`` does not have, as Python refuses an unknown
    keyword argument of ``function``: a misspelt option never passes unseen."""
    known = kind.__required_keys__ | kind.__optional_keys__
    unknown = [name for name in options if name not in known]
    if unknown:
        raise TypeError(
            f"{function}() got an unexpected keyword argument {unknown[0]!r}"
        )


def verbosity(options: TrainOptions) -> int:
    """The ``verbose`` option, ``None`` (or left out) read as 1."""
    verbose = options.get("verbose")
    return 1 if verbose is None else verbose


def accelerator_for(config, options: TrainOptions) -> Accelerator:
    """The ``accelerator`` option, else ``connect()`` as ``config`` asks, on the
    ``device`` option when given (``accelerator.connect_for``)."""
    accelerator = options.get("accelerator")
    return connect_for(config, options.get("device"), accelerator, verbosity(options))


def time_left(options: TrainOptions, start: float) -> float | None:
    """Seconds left of the time limit of a call that began at ``start``
    (``time.monotonic()``); ``None`` without a limit."""
    limit = options.get("time_limit")
    return None if limit is None else limit - (time.monotonic() - start)
