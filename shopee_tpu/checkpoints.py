"""A run folder that survives interruption: checkpoints, history and resume state.

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
The optimizer state carries the iteration count, so a per-step learning-rate schedule
continues where it stopped. Remote folders (``gs://``) go through ``tf.io.gfile``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from shopee_tpu.config import RunConfig, config_diff
from shopee_tpu.utils import atomic_write_text, is_remote, require_tensorflow

# Settings that may change between a run and its resume: where it is written, what
# it is called, where it runs and how it predicts do not change what is trained.
RESUME_IGNORES = ("out_dir", "name", "device", "predict.")


class ConfigMismatch(ValueError):
    """A resume was asked with a config that differs in something that matters."""


class RunFolder:
    """Files of one training run. See the module docstring for the commit protocol."""

    LAST = "last.weights.h5"  # model and optimizer
    BEST = "best.weights.h5"  # model only

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fs().makedirs(self.path)
        self.state = self._read_state()
        self._finish_pending()

    # -- paths and file-system access -------------------------------------------

    def file(self, name: str) -> str:
        return (
            f"{self.path.rstrip('/')}/{name}"
            if is_remote(self.path)
            else (os.path.join(self.path, name))
        )

    def _fs(self):
        return _GFile() if is_remote(self.path) else _LocalFS()

    def exists(self, name: str) -> bool:
        return self._fs().exists(self.file(name))

    # -- state ------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        fs = self._fs()
        path = self.file("state.json")
        if not fs.exists(path):
            return {"epoch": 0, "finished": False, "history": [], "best": None}
        try:
            return json.loads(fs.read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); the run folder is damaged"
            ) from e

    def _write_state(self) -> None:
        atomic_write_text(
            self.file("state.json"), json.dumps(self.state, indent=1) + "\n"
        )

    def _finish_pending(self) -> None:
        pending = self.state.get("pending") or {}
        fs = self._fs()
        for src, dst in pending.items():
            if fs.exists(self.file(src)):
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
    def history(self) -> list[dict[str, Any]]:
        return list(self.state.get("history", []))

    # -- config -----------------------------------------------------------------

    def check_config(self, config: RunConfig, *, write: bool = True) -> None:
        """Saves the config on a fresh run; refuses a resume whose config differs.

        ``write=False`` (processes other than the chief) only checks.
        """
        path = self.file("config.json")
        fs = self._fs()
        if self.epoch > 0 and fs.exists(path):
            saved = RunConfig.from_dict(json.loads(fs.read_text(path)))
            diff = config_diff(saved, config, ignore=RESUME_IGNORES)
            if diff:
                raise ConfigMismatch(
                    f"{self.path} holds a run with a different config; resuming would mix "
                    "two trainings. Use a new --out folder, or undo these changes:\n  "
                    + "\n  ".join(diff)
                )
        if write:
            config.save(path)

    # -- checkpoints ------------------------------------------------------------

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
                with evaluated_weights() if evaluated_weights else _nothing():
                    staged[self.BEST] = _save_weights(
                        model, path, epoch, optimizer=False
                    )
            for dst, local in staged.items() if write else ():
                src = f".pending-{epoch}-{dst}"
                self._fs().put(local, self.file(src))
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

    def mark_finished(self, finished: bool, **extra: Any) -> None:
        self.state.update(finished=finished, **extra)
        self._write_state()

    def write_history_csv(self) -> None:
        import pandas as pd

        atomic_write_text(
            self.file("history.csv"), pd.DataFrame(self.history).to_csv(index=False)
        )

    def restore(self, model, *, optimizer: bool = True, which: str = LAST) -> int:
        """Loads weights (and the optimizer state) into a built, compiled model.

        The optimizer is built first, so Keras loads every one of its variables
        (an unbuilt optimizer has none to load into and would be skipped).

        Raises:
            ValueError: The file's optimizer state does not fit the model's
                optimizer (another optimizer, model or EMA setting).
        """
        with tempfile.TemporaryDirectory() as tmp:
            local = self._fs().get(self.file(which), os.path.join(tmp, which))
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


@contextlib.contextmanager
def _nothing():
    yield


def _save_weights(model, path: str, epoch: int, *, optimizer: bool = True) -> str:
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


class _LocalFS:
    def makedirs(self, p):
        os.makedirs(p, exist_ok=True)

    def exists(self, p):
        return os.path.exists(p)

    def read_text(self, p):
        with open(p, encoding="utf-8") as f:
            return f.read()

    def rename(self, a, b):
        os.replace(a, b)

    def remove(self, p):
        os.remove(p)

    def listdir(self, p):
        return os.listdir(p)

    def put(self, local, dst):
        shutil.copyfile(local, dst)

    def get(self, src, local):
        return src


class _GFile:
    def __init__(self):
        self.g = require_tensorflow().io.gfile

    def makedirs(self, p):
        self.g.makedirs(p)

    def exists(self, p):
        return self.g.exists(p)

    def read_text(self, p):
        with self.g.GFile(p, "r") as f:
            return f.read()

    def rename(self, a, b):
        self.g.rename(a, b, overwrite=True)

    def remove(self, p):
        self.g.remove(p)

    def listdir(self, p):
        return [n.rstrip("/") for n in self.g.listdir(p)]

    def put(self, local, dst):
        self.g.copy(local, dst, overwrite=True)

    def get(self, src, local):
        self.g.copy(src, local, overwrite=True)
        return local
