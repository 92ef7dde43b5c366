"""``shopee-tpu sweep``: one run per point of a grid of config values, and the table
that compares them (the ablation tables of the Cdiscount 3rd place, without the
hand work)::

    shopee-tpu sweep --preset demo --set data.train=recs/train \\
        --grid model.dropout=0,0.3 --grid data.image_size=32,48 --out runs/ablation

trains four runs, each a normal run folder (a k-fold run with ``--folds K``) named
after the values it changes (``runs/ablation/dropout-0.3_image_size-48``). Rerunning
skips finished points and resumes an interrupted one. ``DIR/results.csv`` and
``DIR/results.md`` hold one row per point (the changed values, the best validation
accuracy or the out-of-fold accuracy, epochs and training time) and
``DIR/results.png`` plots the accuracy against each changed key.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import itertools
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Unpack

import pandas as pd

from shopee_tpu import (
    fs,
    plots,  # matplotlib
)
from shopee_tpu.config import ConfigError, RunConfig
from shopee_tpu.experiments.kfold import train_folds
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training import TrainOptions, train
from shopee_tpu.training.options import (
    accelerator_for,
    check_options,
    time_left,
    verbosity,
)

__all__ = [
    "check_key",
    "grid_points",
    "parse_grid",
    "result_row",
    "results_markdown",
    "run_sweep",
]

# Keys a sweep sets itself, per point.
_RESERVED = ("name", "out_dir", "data.fold")


def _dotted_keys(section, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += _dotted_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def parse_grid(items: Sequence[str], base: RunConfig) -> list[tuple[str, list[str]]]:
    """Parses ``key=v1,v2,...`` items into ``[(key, [values])]``, checking each value.

    Values are separated by commas; for keys that take a list (``predict.tta``),
    separate the points with ``;`` instead (``identity;identity,flip_lr``).

    Raises:
        ConfigError: A malformed item, an unknown key (named, with the close
            matches and the keys of its section), a value that does not parse for
            its key (both named) or a key given twice.
    """
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid expects key=value1,value2,..., got {item!r}")
        check_key(key, base, "--grid", given=[k for k, _ in axes])
        values = [v.strip() for v in raw.split(";" if ";" in raw else ",")]
        for value in values:
            if not value:
                raise ConfigError(f"--grid {key}: empty value in {raw!r}")
            try:
                base.override(f"{key}={value}")
            except ConfigError as e:
                raise ConfigError(
                    f"--grid {key}: value {value!r} does not parse ({e})"
                ) from None
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: repeated values in {raw!r}")
        axes.append((key, values))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=values")
    return axes


def check_key(
    key: str, base: RunConfig, flag: str, *, owner: str = "the sweep", given=()
) -> None:
    """Refuses a key that is not in the config (naming close matches and the keys
    of its section), that a search sets itself, or that is ``given`` already."""
    known = _dotted_keys(base)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        section = key.rpartition(".")[0]
        siblings = [k for k in known if k.rpartition(".")[0] == section]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{flag} {key!r} is not a config key{hint} (keys "
            f"{'of ' + section if section else 'at the top level'}: "
            f"{', '.join(siblings) or 'none'})"
        )
    if key in _RESERVED:
        raise ConfigError(f"{flag} {key!r}: {owner} sets {key} for each run")
    if key in given:
        raise ConfigError(f"{flag} {key!r} is given twice")


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"


def grid_points(
    base: RunConfig, axes: list[tuple[str, list[str]]]
) -> list[tuple[str, dict[str, str], RunConfig]]:
    """Every combination of the axes: ``(folder name, {key: value}, config)``."""
    last = [k.rpartition(".")[2] for k, _ in axes]
    short = {
        k: (s if last.count(s) == 1 else k)
        for (k, _), s in zip(axes, last, strict=True)
    }
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        changes = dict(zip((k for k, _ in axes), combo, strict=True))
        name = "_".join(f"{short[k]}-{_slug(v)}" for k, v in changes.items())
        cfg = base.override([f"{k}={v}" for k, v in changes.items()])
        points.append((name, changes, cfg))
    names = [p[0] for p in points]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"grid points share a folder name: {clash[0]!r}")
    return points


def _finished_metrics(where: str, cfg: RunConfig) -> dict | None:
    """The metrics of a finished point, or None; a point trained with another config
    is refused (as ``train()`` refuses to resume it)."""
    if not fs.exists(where):
        return None
    folder = RunFolder(where, writable=False)
    saved = folder.saved_config()
    if saved is None or not folder.exists(RunFolder.METRICS):
        return None
    folder.refuse_other(saved, cfg)
    metrics = folder.metrics()
    if cfg.data.folds:
        return metrics if metrics.get("complete") else None
    return metrics if folder.finished else None


def result_row(changes: dict, metrics: dict | None, where: str, status: str) -> dict:
    """One results row: the changed values, the run's figures and its status."""
    row: dict = dict(changes)
    metrics = metrics or {}
    if "per_fold" in metrics:  # a k-fold point
        folds = metrics["per_fold"]
        best = [f["best_val_accuracy"] for f in folds if f["best_val_accuracy"]]
        row.update(
            best_val_accuracy=round(sum(best) / len(best), 4) if best else None,
            oof_accuracy=metrics.get("oof_accuracy"),
            epochs=max(f["epochs"] or 0 for f in folds),
            train_time_sec=metrics.get("train_time_sec"),
        )
    else:
        history = RunFolder(where, writable=False).history if fs.exists(where) else []
        time_sec = round(sum(r.get("epoch_time_sec", 0.0) for r in history), 1)
        best = metrics.get("best_val_accuracy")
        row.update(
            best_val_accuracy=round(best, 4) if best is not None else None,
            oof_accuracy=None,
            epochs=metrics.get("epochs_completed"),
            train_time_sec=time_sec,
        )
    row.update(status=status, run=os.path.basename(where))
    return row


def run_sweep(
    base: RunConfig,
    grid: Sequence[str],
    out: str | os.PathLike,
    *,
    folds: int | None = None,
    **options: Unpack[TrainOptions],
) -> pd.DataFrame:
    """Trains every grid point (skipping finished ones) and writes the results.

    Args:
        base: The config every point starts from.
        grid: ``key=v1,v2,...`` items (see ``parse_grid``).
        out: The sweep folder: one run folder per point plus ``results.csv``,
            ``results.md`` and ``results.png``.
        folds: Train each point as a k-fold run of this many folds.
        **options: How this call trains (``shopee_tpu.training.TrainOptions``),
            handed to each point's run. The time limit is the call's, across
            points: those that no longer fit are left for the next call (their
            rows say ``not run``).

    Returns:
        The results table, one row per point.

    Raises:
        TypeError: An option that ``TrainOptions`` does not have.
    """
    check_options("run_sweep", options)
    start, verbose = time.monotonic(), verbosity(options)
    out = os.fspath(out)
    if folds is not None:
        base = base.replace(data=base.data.replace(folds=int(folds)))
    axes = parse_grid(grid, base)
    points = grid_points(base, axes)
    os.makedirs(out, exist_ok=True)
    rows, trained = _run_points(points, out, start, options)
    results = pd.DataFrame(rows)
    keys = [k for k, _ in axes]
    _write_results(out, results, axes, base)
    if verbose:
        print(results_markdown(results, keys, base))
        print(f"{out}: {trained} of {len(points)} points trained in this call")
    results.attrs["trained"] = trained
    return results


def _run_points(
    points, out: str, start: float, options: TrainOptions
) -> tuple[list[dict], int]:
    """Trains the points that are not finished while time is left; one results row
    per point, and how many points trained."""
    acc, verbose = None, verbosity(options)
    rows, trained = [], 0
    for n, (name, changes, cfg) in enumerate(points):
        where = os.path.join(out, name)
        cfg = cfg.replace(name=name, out_dir=where)
        metrics = _finished_metrics(where, cfg)
        if metrics is not None:
            if verbose:
                print(f"{where}: finished; skipped")
            rows.append(result_row(changes, metrics, where, "finished"))
            continue
        remaining = time_left(options, start)
        if remaining is not None and remaining <= 0:
            rows.append(result_row(changes, None, where, "not run (time limit)"))
            continue
        if verbose:
            print(f"{where}: point {n + 1} of {len(points)}: {changes}")
        acc = acc or accelerator_for(cfg, options)
        each: TrainOptions = {**options, "time_limit": remaining, "accelerator": acc}
        rows.append(_train_point(cfg, changes, where, each))
        trained += 1
    return rows, trained


def _train_point(cfg: RunConfig, changes, where, options: TrainOptions) -> dict:
    """Trains (or resumes) one point, as a k-fold run when ``data.folds`` is set."""
    if cfg.data.folds:
        result = train_folds(cfg, out_dir=where, **options)
    else:  # the limit is every point's: it only stops a run (as in k-fold runs)
        result = train(cfg, out_dir=where, fit_to_time=False, **options)
    finished = result.metrics.get("finished", result.metrics.get("complete"))
    status = "finished" if finished else "stopped (time limit); rerun to resume"
    row = result_row(changes, result.metrics, where, status)
    del result
    gc.collect()
    return row


def _write_results(out: str, results: pd.DataFrame, axes, base: RunConfig) -> None:
    """``sweep.json`` (the grid and its base), ``results.csv``, ``results.md`` and
    the plot ``results.png``."""
    keys = [k for k, _ in axes]
    sweep = {"grid": dict(axes), "base": base.to_dict()}
    fs.write_text(os.path.join(out, "sweep.json"), json.dumps(sweep, indent=1) + "\n")
    fs.write_text(os.path.join(out, "results.csv"), results.to_csv(index=False))
    fs.write_text(
        os.path.join(out, "results.md"), results_markdown(results, keys, base) + "\n"
    )
    metric = _metric(results)
    plots.plot_sweep(results, keys, metric, os.path.join(out, "results.png"))


def _metric(results: pd.DataFrame) -> str:
    return (
        "oof_accuracy" if results["oof_accuracy"].notna().all() else "best_val_accuracy"
    )


def results_markdown(
    results: pd.DataFrame, keys: Sequence[str], base: RunConfig, kind: str = "Sweep"
) -> str:
    """The results table in Markdown, with the base it varies."""
    cols = list(keys) + [
        "best_val_accuracy",
        "oof_accuracy",
        "epochs",
        "train_time_sec",
        "status",
    ]
    if results["oof_accuracy"].isna().all():
        cols.remove("oof_accuracy")

    def cell(v):
        return "" if v is None or (isinstance(v, float) and v != v) else str(v)

    lines = [
        f"{kind} over {', '.join(keys)} from `{base.name}` "
        f"({'k-fold, ' + str(base.data.folds) + ' folds, ' if base.data.folds else ''}"
        f"{base.epochs} epochs, seed {base.seed}).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for _, row in results.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in cols) + " |")
    return "\n".join(lines)
