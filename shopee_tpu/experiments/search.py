"""``shopee-tpu tune``: an Optuna search over config keys, one run folder per trial::

    shopee-tpu tune --preset demo --set data.train=recs/train \\
        --space optim.learning_rate=1e-4:1e-2:log --space model.dropout=0:0.5 \\
        --space model.backbone=efficientnet-phi-6,tiny-cnn --trials 20 --out runs/tune

A search space item is ``key=a,b,c`` (one of these values, as ``--set`` reads
them), ``key=low:high`` (uniform; whole numbers when the key is an integer) or
``key=low:high:log`` (log-uniform). Each trial trains a normal run folder
(``DIR/trial-007``) and is scored by its best validation accuracy. The study lives
in ``DIR/study.db`` (SQLite), so a rerun of the same command resumes it: a trial
that was interrupted resumes its own run folder with its own values, and new
trials are drawn until ``--trials`` are done. ``DIR/results.csv``,
``DIR/results.md`` and ``DIR/results.png`` have the form of ``sweep``'s.

Optuna is the optional ``[tune]`` extra, imported only here. One process runs a
study at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
import typing
from collections.abc import Sequence
from typing import Unpack

import pandas as pd

from shopee_tpu import (
    fs,
    plots,  # matplotlib
)
from shopee_tpu.config import ConfigError, RunConfig
from shopee_tpu.experiments.sweep import check_key, result_row, results_markdown
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training import TrainOptions, train
from shopee_tpu.training.options import (
    accelerator_for,
    check_options,
    time_left,
    verbosity,
)
from shopee_tpu.utils import require_extra

__all__ = ["Dimension", "parse_space", "tune"]

STUDY = "study.db"


def _trial_dir(out: str, number: int) -> str:
    return os.path.join(out, f"trial-{number:03d}")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key of the search space: values to choose from, or a numeric range."""

    key: str
    choices: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> str:
        """The trial's value for the key, as a ``--set`` string."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return str(
                trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
            )
        return repr(trial.suggest_float(self.key, self.low, self.high, log=self.log))


def _field_type(base: RunConfig, key: str):
    owner, *_ = key.rpartition(".")
    section = base
    for part in owner.split(".") if owner else ():
        section = getattr(section, part)
    hints = typing.get_type_hints(type(section))
    return hints[key.rpartition(".")[2]]


def parse_space(items: Sequence[str], base: RunConfig) -> list[Dimension]:
    """Parses ``--space`` items (see the module docstring), checking each key and
    value against the config.

    Raises:
        ConfigError: A malformed item, an unknown key (named, with close matches),
            a value that does not parse for its key, or a bad range.
    """
    dims: list[Dimension] = []
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError(
                f"--space expects key=a,b or key=low:high[:log], got {item!r}"
            )
        check_key(key, base, "--space", owner="tune", given=[d.key for d in dims])
        dims.append(_dimension(key, raw, base))
    if not dims:
        raise ConfigError("a search needs at least one --space key=...")
    return dims


def _dimension(key: str, raw: str, base: RunConfig) -> Dimension:
    hint = _field_type(base, key)
    if ":" not in raw:
        choices = tuple(v.strip() for v in raw.split(","))
        for value in choices:
            try:
                base.override(f"{key}={value}")
            except ConfigError as e:
                raise ConfigError(
                    f"--space {key}: value {value!r} does not parse ({e})"
                ) from None
        return Dimension(key, choices=choices)
    parts = raw.split(":")
    log = parts[2:] == ["log"]
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ConfigError(
            f"--space {key}: expected low:high or low:high:log, got {raw!r}"
        )
    if hint not in (int, float):
        raise ConfigError(
            f"--space {key}: a range needs a numeric key; list values instead"
        )
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--space {key}: {raw!r} is not a numeric range") from None
    if not low < high or (log and low <= 0):
        raise ConfigError(
            f"--space {key}: need low < high (and low > 0 with log), got {raw!r}"
        )
    return Dimension(key, low=low, high=high, log=log, integer=hint is int)


def _optuna():
    require_extra("optuna", "tune", "shopee-tpu tune")
    import optuna  # the optional [tune] extra

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _study(optuna, out: str, seed: int, space: list[Dimension], base: RunConfig):
    """The study in ``out`` (created, or resumed when its search is the same)."""
    record = {"space": [dataclasses.asdict(d) for d in space], "base": base.to_dict()}
    saved_path = os.path.join(out, "tune.json")
    if fs.exists(saved_path):
        saved = fs.read_json(saved_path, what="the search of this folder")
        if saved != json.loads(json.dumps(record)):
            raise ConfigError(
                f"{out} holds a search with another space or base config; use a new "
                "--out folder, or repeat that search's command to resume it"
            )
    else:
        fs.makedirs(out)
        fs.write_json(saved_path, record)
    study = optuna.create_study(
        study_name="tune",
        storage=f"sqlite:///{os.path.abspath(os.path.join(out, STUDY))}",
        direction="maximize",
        load_if_exists=True,
    )
    # Seeded by the trials so far: each call draws a new stream, so a resumed
    # search never redraws the values of its first trials.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def tune(
    base: RunConfig,
    space: Sequence[str],
    out: str | os.PathLike,
    *,
    trials: int,
    **options: Unpack[TrainOptions],
) -> pd.DataFrame:
    """Runs (or resumes) the search until ``trials`` trials are done; returns the
    results table, one row per trial (see the module docstring).

    Args:
        base: The config every trial starts from (its seed seeds the sampler).
        space: ``--space`` items (see ``parse_space``).
        out: The search folder.
        trials: Trials to have done when the call ends.
        **options: How this call trains (``shopee_tpu.training.TrainOptions``),
            handed to each trial's ``train``. The time limit is the call's, across
            trials: an unfinished trial resumes next call.

    Raises:
        TypeError: An option that ``TrainOptions`` does not have.
    """
    check_options("tune", options)
    verbose = verbosity(options)
    optuna = _optuna()
    start, out = time.monotonic(), os.fspath(out)
    dims = parse_space(space, base)
    if not base.data.valid and base.data.valid_fraction <= 0:
        raise ConfigError(
            "tune scores each trial by its validation accuracy: keep "
            "data.valid_fraction > 0 or set data.valid"
        )
    study = _study(optuna, out, base.seed, dims, base)
    state = optuna.trial.TrialState
    acc = None
    while True:
        remaining = time_left(options, start)
        pending = [t for t in study.trials if t.state == state.RUNNING]
        done = [t for t in study.trials if t.state in (state.COMPLETE, state.FAIL)]
        if (not pending and len(done) >= trials) or (
            remaining is not None and remaining <= 0
        ):
            break
        trial = pending[0] if pending else study.ask()
        number = trial.number
        changes = trial.params if pending else {d.key: d.suggest(trial) for d in dims}
        where = _trial_dir(out, number)
        if verbose:
            print(f"{where}: trial {number + 1} of {trials}: {changes}")
        cfg = base.override([f"{k}={v}" for k, v in changes.items()])
        cfg = cfg.replace(name=os.path.basename(where), out_dir=where)
        acc = acc or accelerator_for(cfg, options)
        each: TrainOptions = {**options, "time_limit": remaining, "accelerator": acc}
        # The limit is every trial's: it only stops one.
        result = train(cfg, fit_to_time=False, **each)
        if not result.metrics["finished"]:
            break  # the time limit: this trial resumes on the next call
        value = result.metrics["best_val_accuracy"]
        study.tell(number, value if value is not None else float("nan"))
        del result
        gc.collect()
    return _write_results(study, dims, out, base, verbose)


def _write_results(study, dims, out: str, base: RunConfig, verbose: int):
    """``results.csv``, ``results.md`` and ``results.png``: one row per trial."""
    keys = [d.key for d in dims]
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        where = _trial_dir(out, t.number)
        folder = RunFolder(where, writable=False)
        metrics = folder.metrics() if folder.exists(RunFolder.METRICS) else None
        status = {"COMPLETE": "finished", "FAIL": "no validation score"}.get(
            t.state.name, "stopped; rerun to resume"
        )
        row = result_row({k: t.params.get(k) for k in keys}, metrics, where, status)
        rows.append({"trial": t.number, **row})
    results = pd.DataFrame(rows)
    table = results_markdown(results, keys, base, kind="Search")
    fs.write_text(os.path.join(out, "results.csv"), results.to_csv(index=False))
    fs.write_text(os.path.join(out, "results.md"), table + "\n")
    if len(results):
        path = os.path.join(out, "results.png")
        plots.plot_sweep(results, keys, "best_val_accuracy", path)
    if verbose:
        print(table)
    return results
