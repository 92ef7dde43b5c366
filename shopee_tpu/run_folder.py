"""A training run's folder: the one reader and writer of its files.

Kaggle sessions end without warning (the 9-12 h limit, a preempted TPU, a closed
browser), so finished epochs are committed as one unit (every epoch, or at most every
minute of training: see ``EpochCommit``):

1. the model weights with the optimizer state (Keras' own ``save_weights`` format,
   which stores a compiled model's optimizer next to its layers) and, if improved,
   the best weights (without the optimizer) are written under ``.pending-*`` names;
2. ``state.json`` is replaced atomically; it names the pending files and holds the
   whole history. This replace is the commit point;
3. the pending files are renamed to ``last.weights.h5`` and ``best.weights.h5``,
   and ``history.csv`` is rewritten from the state.

A run killed anywhere in between resumes from a consistent epoch: before the commit
the pending files are ignored, after it the renames are completed on the next start.
A reader (``writable=False``: a run in a read-only Kaggle input, or still training
on another host) changes nothing and finds the committed weights under either name.
The optimizer state carries the iteration count, so a per-step learning-rate
schedule continues where it stopped. Folders may be local or in a bucket (``gs://``).

The folder also holds the run's ``config.json``, ``label_map.json`` and
``metrics.json``; a k-fold run (``shopee_tpu.experiments.kfold``) holds one run
folder per fold, ``fold-<i>``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from shopee_tpu import fs
from shopee_tpu.config import RunConfig, config_diff

__all__ = ["RunFolder", "ConfigMismatch", "RESUME_IGNORES", "fold_path"]

# Settings that may change between a run and its resume: where it is written, what
# it is called, where it runs and how it predicts do not change what is trained.
RESUME_IGNORES = ("out_dir", "name", "device", "predict.")


class ConfigMismatch(ValueError):
    """A resume was asked with a config that differs in something that matters."""


class RunFolder:
    """Files of one training run. See the module docstring for the commit protocol.

    Args:
        path: The folder (created when writable).
        writable: ``False`` opens it for reading only.
    """

    CONFIG, STATE, LABEL_MAP = "config.json", "state.json", "label_map.json"
    METRICS, HISTORY = "metrics.json", "history.csv"
    LAST = "last.weights.h5"  # model and optimizer
    BEST = "best.weights.h5"  # model only

    def __init__(self, path: str | os.PathLike, *, writable: bool = True):
        self.path, self.writable = os.fspath(path), writable
        if writable:
            fs.makedirs(self.path)
        self.state = self._read_state()
        if writable:
            self._finish_pending()

    def file(self, name: str) -> str:
        return fs.join(self.path, name)

    def exists(self, name: str) -> bool:
        return fs.exists(self.file(name))

    # -- state ------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        if not self.exists(self.STATE):
            return {"epoch": 0, "finished": False, "history": [], "best": None}
        try:
            return fs.read_json(self.file(self.STATE))
        except ValueError as e:
            raise ValueError(f"{e}; the run folder is damaged") from None

    def _write_state(self) -> None:
        fs.write_json(self.file(self.STATE), self.state)

    def _finish_pending(self) -> None:
        pending = self.state.get("pending") or {}
        for src, dst in pending.items():
            if self.exists(src):
                fs.rename(self.file(src), self.file(dst))
        if pending:
            self.state.pop("pending")
            self._write_state()
        # Pending files of an epoch that never committed are stale.
        for name in fs.listdir(self.path):
            if name.startswith(".pending-"):
                fs.remove(self.file(name))

    @property
    def epoch(self) -> int:
        """Number of committed (completed) epochs."""
        return int(self.state.get("epoch", 0))

    @property
    def finished(self) -> bool:
        return bool(self.state.get("finished"))

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.state.get("history", []))

    @property
    def planned_epochs(self) -> int | None:
        """The epoch count a time limit planned (``shopee_tpu.training.time_plan``),
        ``None`` when none did."""
        value = self.state.get("planned_epochs")
        return None if value is None else int(value)

    def plan_epochs(self, epochs: int) -> None:
        """Sets the planned epoch count; the next commit writes it, with the
        optimizer state whose schedule ends there."""
        self.state["planned_epochs"] = int(epochs)

    def mark_finished(self, finished: bool, **extra: Any) -> None:
        self.state.update(finished=finished, **extra)
        self._write_state()

    def write_history_csv(self) -> None:
        import pandas as pd  # a heavy import most readers of a run never need

        fs.write_text(
            self.file(self.HISTORY), pd.DataFrame(self.history).to_csv(index=False)
        )

    # -- config, label map, metrics -----------------------------------------------

    def config(self) -> RunConfig:
        """The run's saved config."""
        path = self.file(self.CONFIG)
        return RunConfig.from_dict(
            fs.read_json(path, what="is this a training run folder?")
        )

    def saved_config(self) -> RunConfig | None:
        """The saved config, or ``None`` before the run saved one."""
        return self.config() if self.exists(self.CONFIG) else None

    def check_config(self, config: RunConfig, *, write: bool = True) -> None:
        """Saves the config on a fresh run; refuses a resume whose config differs.

        ``write=False`` (processes other than the chief) only checks.

        Raises:
            ConfigMismatch: The differences, one ``key: saved -> new`` line each.
        """
        saved = self.saved_config() if self.epoch > 0 else None
        if saved is not None:
            self.refuse_other(saved, config)
        if write:
            config.save(self.file(self.CONFIG))

    def refuse_other(self, saved: RunConfig, config: RunConfig) -> None:
        diff = config_diff(saved, config, ignore=RESUME_IGNORES)
        if diff:
            raise ConfigMismatch(
                f"{self.path} holds a run with a different config; resuming would mix "
                "two trainings. Use a new --out folder, or undo these changes:\n  "
                + "\n  ".join(diff)
            )

    def label_map(self) -> dict[str, int]:
        """``{category: class id}``, checked to be the ids 0..n-1."""
        path = self.file(self.LABEL_MAP)
        found = fs.read_json(path, what="is this a training run folder?")
        label_map = {str(k): int(v) for k, v in found.items()}
        if sorted(label_map.values()) != list(range(len(label_map))):
            raise ValueError(f"{path}: class ids are not 0..{len(label_map) - 1}")
        return label_map

    def save_label_map(self, label_map: dict[str, int]) -> None:
        fs.write_json(self.file(self.LABEL_MAP), label_map)

    def metrics(self) -> dict[str, Any]:
        return fs.read_json(self.file(self.METRICS), what="the run has not finished")

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        fs.write_json(self.file(self.METRICS), metrics)

    # -- weights ----------------------------------------------------------------

    def weights(self, which: str = "best") -> str:
        """The committed weights file to load: ``best`` (else ``last``) or ``last``.

        Raises:
            ValueError: ``which`` is neither.
            FileNotFoundError: No such weights yet.
        """
        names = {"best": [self.BEST, self.LAST], "last": [self.LAST]}
        if which not in names:
            raise ValueError(f"weights must be 'best' or 'last', got {which!r}")
        # Committed but not yet renamed (a reader of a run that is training).
        pending = {dst: src for src, dst in (self.state.get("pending") or {}).items()}
        for name in names[which]:
            for candidate in (pending.get(name), name):
                if candidate and self.exists(candidate):
                    return self.file(candidate)
        raise FileNotFoundError(
            f"{self.path}: no {' or '.join(names[which])}; train first"
        )

    def commit_epoch(
        self,
        model,
        epoch: int,
        row: dict[str, Any],
        *,
        monitor: str | None,
        mode: str = "max",
        write: bool = True,
        evaluated_weights=None,
        earlier: Sequence[dict[str, Any]] = (),
    ) -> bool:
        """Commits a completed epoch (1-based); returns whether it is the new best.

        ``earlier`` holds the history rows of epochs trained since the last commit
        and not committed themselves (``EpochCommit`` commits at most every so
        many seconds); they join the history with ``row``, and resuming starts
        after ``epoch``.

        ``write=False`` (non-chief workers of a multi-worker run) updates nothing on
        disk, so only one process writes the shared folder; it still saves (to a
        scratch folder: saving holds collectives on multi-host JAX, which every
        process must join) and keeps the same state in memory. ``evaluated_weights`` is
        a context manager that swaps in the weights validation used (the EMA
        weights), so ``best`` holds what was scored while ``last`` keeps the raw
        training weights that the optimizer state belongs to. ``monitor=None`` (a
        run without validation) makes every epoch the new best.
        """
        improved = self.improves(row, monitor, mode)
        pending = {}
        with tempfile.TemporaryDirectory() as tmp:
            staged = {
                self.LAST: _save_weights(model, os.path.join(tmp, self.LAST), epoch)
            }
            if improved:
                path = os.path.join(tmp, self.BEST)
                with (
                    evaluated_weights()
                    if evaluated_weights
                    else contextlib.nullcontext()
                ):
                    staged[self.BEST] = _save_weights(
                        model, path, epoch, optimizer=False
                    )
            for dst, local in staged.items() if write else ():
                src = f".pending-{epoch}-{dst}"
                fs.put(local, self.file(src))
                pending[src] = dst
        rows = [*earlier, row]
        first = rows[0]["epoch"]
        history = [r for r in self.history if r["epoch"] < first] + rows
        self.state.update(epoch=epoch, history=history)
        if improved:
            self.state["best"] = {
                "epoch": epoch,
                "monitor": monitor,
                "value": row.get(monitor) if monitor else None,
                "image_size": row.get("image_size"),
            }
        if not write:
            return improved
        self.state["pending"] = pending
        self._write_state()  # the commit point
        self._finish_pending()
        self.write_history_csv()
        return improved

    def improves(
        self, row: dict[str, Any], monitor: str | None, mode: str = "max"
    ) -> bool:
        """Whether the epoch of ``row`` replaces the best one.

        Without a monitor (no validation) the latest epoch is the one kept. An
        epoch at another image size than the best one's replaces it: accuracy
        measured at a smaller size of progressive resizing says little about
        those weights at the full size (a 48 px best can score chance at 64 px).
        """
        if monitor is None:
            return True
        value, best = row.get(monitor), self.state.get("best")
        if value is None:
            return False
        if best is None or best.get("image_size") != row.get("image_size"):
            return True
        return value > best["value"] if mode == "max" else value < best["value"]

    def restore(self, model, *, optimizer: bool = True, which: str = LAST) -> int:
        """Loads weights (and the optimizer state) into a built, compiled model.

        The optimizer is built first, so Keras loads every one of its variables
        (an unbuilt optimizer has none to load into and would be skipped).

        Raises:
            ValueError: The file's optimizer state does not fit the model's
                optimizer (another optimizer, model or EMA setting).
        """
        with fs.local_copy(self.file(which)) as local:
            opt = getattr(model, "optimizer", None)
            if opt is None or not optimizer:
                skip = [opt] if opt is not None else None
                model.load_weights(local, objects_to_skip=skip)
                return self.epoch
            if not opt.built:
                opt.build(model.trainable_variables)
            saved = _optimizer_variable_count(local)
            if saved != len(opt.variables):
                raise ValueError(
                    f"{self.file(which)}: holds {saved} optimizer variables, the "
                    f"model's optimizer has {len(opt.variables)}; was the model or "
                    "the optimizer changed?"
                )
            model.load_weights(local)
        return self.epoch

    # -- k-fold runs ------------------------------------------------------------

    def fold(self, i: int) -> str:
        """The folder of fold ``i`` of a k-fold run."""
        return fold_path(self.path, i)

    def folds(self) -> list[str]:
        """A k-fold run's fold folders (from its config); ``[]`` for one run."""
        data = self.config().data
        if not data.folds or data.fold is not None:
            return []
        return [self.fold(i) for i in range(data.folds)]


def fold_path(run: str | os.PathLike, i: int) -> str:
    """The folder of fold ``i`` of the k-fold run in ``run``."""
    return fs.join(run, f"fold-{i}")


def _save_weights(model, path: str, epoch: int, *, optimizer: bool = True) -> str:
    # Deferred: Keras only after connect() has chosen its backend.
    import h5py
    import keras

    opt = getattr(model, "optimizer", None)
    skip = [opt] if opt is not None and not optimizer else None
    keras.saving.save_weights(model, path, objects_to_skip=skip)
    with h5py.File(path, "a") as f:
        f.attrs["shopee_tpu_epoch"] = epoch
    return path


def _optimizer_variable_count(path: str) -> int:
    """Optimizer variables in a Keras ``.weights.h5`` file (0 when it has none)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f.get("optimizer/vars")
        return 0 if group is None else len(group.keys())
