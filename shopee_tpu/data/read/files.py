"""Finding, counting and holding out TFRecord shards, without reading them.

Counts come from the Kaggle file-name convention (``flowers00-230.tfrec``,
``train-03-5269.tfrec``: the number before the extension) or from the
``manifest.json`` beside the files. A full scan of a 100k-image dataset on a TPU VM
takes minutes, so it is never done implicitly.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from shopee_tpu import fs
from shopee_tpu.data.manifests import manifests_of

__all__ = [
    "list_files",
    "count_records",
    "record_counts",
    "holdout_files",
    "HoldoutWarning",
]

_COUNT = re.compile(r"-(\d+)\.tfrec(?:ord)?$")
_SUFFIXES = ("*.tfrec", "*.tfrecord", "*.tfrecords")


def list_files(files_or_pattern: str | os.PathLike | Sequence) -> list[str]:
    """Expands a folder, glob, file or list of them (local or gs://) to sorted files.

    A folder means every ``*.tfrec``/``*.tfrecord`` file directly inside it.

    Raises:
        FileNotFoundError: Nothing matches (the message shows what was asked).
    """
    if isinstance(files_or_pattern, str | os.PathLike):
        items = [os.fspath(files_or_pattern)]
    else:
        items = [os.fspath(f) for f in files_or_pattern]
    out: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            out.extend(fs.glob(item))
        elif fs.isdir(item):
            for suffix in _SUFFIXES:
                out.extend(fs.glob(item.rstrip("/") + "/" + suffix))
        elif fs.is_remote(item) or os.path.exists(item):
            out.append(item)
    files = sorted(set(out))
    if not files:
        raise FileNotFoundError(f"no TFRecord files found for {files_or_pattern!r}")
    return files


def _split(path: str) -> tuple[str, str]:
    """``(folder, file name)`` of a local or gs:// path."""
    return tuple(path.rsplit("/", 1)) if "/" in path else ("", path)


def count_records(files: str | os.PathLike | Sequence) -> int:
    """Total records, from the file names or the manifest (never a scan).

    Raises:
        ValueError: A file has no count in its name and no manifest lists it.
    """
    return sum(record_counts(files))


def record_counts(files: str | os.PathLike | Sequence) -> list[int]:
    """The records of each file (sorted, as ``list_files`` gives them), from the
    file names or the manifest (never a scan).

    Raises:
        ValueError: A file has no count in its name and no manifest lists it.
    """
    out = []
    paths = list_files(files)
    manifests = manifests_of(paths)
    for path in paths:
        folder, name = _split(path)
        counts = manifests[folder or "."].get("shards", {})
        if name in counts:
            out.append(int(counts[name]))
            continue
        match = _COUNT.search(name)
        if not match:
            raise ValueError(
                f"cannot count {path} without reading it: its name has no record "
                "count (…-<count>.tfrec) and no manifest.json beside it lists it"
            )
        out.append(int(match.group(1)))
    return out


def holdout_files(
    files: str | os.PathLike | Sequence, fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """A seeded choice of whole shards for validation.

    With our writer each shard is a stratified fold that keeps products together, so
    this is a stratified split by group. It holds out ``round(fraction * shards)``
    shards, which honours ``fraction`` to within half a shard's share; when that
    rounds to no shard (or to all), one shard is held out (or kept) instead and a
    ``HoldoutWarning`` says what fraction was used, why, and how many shards would
    give the one asked.

    Returns:
        ``(train_files, valid_files)``, each sorted; at least one of each when
        ``0 < fraction < 1``.
    """
    files = list_files(files)
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return files, []
    if len(files) < 2:
        raise ValueError(
            f"holding out {fraction:.0%} of the shards needs at least 2 files, got "
            f"{len(files)}; write more shards (--shards) or pass validation records"
        )
    wanted = round(fraction * len(files))
    n_valid = min(len(files) - 1, max(1, wanted))
    chosen = set(np.random.default_rng(seed).choice(len(files), n_valid, replace=False))
    train = [f for i, f in enumerate(files) if i not in chosen]
    valid = [f for i, f in enumerate(files) if i in chosen]
    if n_valid != wanted:
        warnings.warn(
            _holdout_note(fraction, files, valid), HoldoutWarning, stacklevel=2
        )
    coverage = _coverage_note(files, valid)
    if coverage:
        warnings.warn(coverage, HoldoutWarning, stacklevel=2)
    return train, valid


class HoldoutWarning(UserWarning):
    """The validation hold-out cannot be trusted as asked: it differs from
    ``valid_fraction`` by more than half a shard's share (it takes whole shards), or
    it holds at most half of the classes."""


def _coverage_note(files: list[str], valid: list[str]) -> str | None:
    """Says so when the held-out shards hold at most half of the classes.

    Shards that keep groups together can be narrow: 16 regions of 4 photos in 8
    shards put 2 regions, often 2 classes, in each. On such a hold-out an untrained
    model that answers one class scores 0.5, and the best epoch it picks is the
    first. The per-shard class counts come from our writer's manifest; without
    them nothing is said.
    """
    manifests = manifests_of(files)

    def classes(paths: list[str]) -> dict[str, int] | None:
        out: dict[str, int] = {}
        for path in paths:
            folder, name = _split(path)
            shard = manifests[folder or "."].get("shard_class_counts", {}).get(name)
            if shard is None:
                return None
            for label, n in shard.items():
                out[label] = out.get(label, 0) + int(n)
        return out

    everywhere, held = classes(files), classes(valid)
    if not everywhere or not held or 2 * len(held) > len(everywhere):
        return None
    one_class = max(held.values()) / sum(held.values())
    return (
        f"the validation hold-out ({len(valid)} of {len(files)} shards) holds "
        f"{len(held)} of {len(everywhere)} classes: a model answering only its "
        f"commonest class scores {one_class:.2f} there, so its accuracy, and the "
        "best epoch it picks, say little. Hold out more (data.valid_fraction), or pass "
        "validation records that cover the classes (data.valid)."
    )


def _holdout_note(fraction: float, files: list[str], valid: list[str]) -> str:
    try:
        used = count_records(valid) / count_records(files)
        what = "of the records"
    except ValueError:
        used = len(valid) / len(files)
        what = "of the shards"
    shards = max(2, math.ceil(1 / min(fraction, 1 - fraction) - 1e-9))
    return (
        f"valid_fraction {fraction:g}: held out {len(valid)} of {len(files)} shards = "
        f"{used:.1%} {what}. The hold-out takes whole shards (each keeps its "
        f"products together), so {len(files)} shards split in steps of "
        f"{1 / len(files):.0%}. Write {shards} or more shards (--shards {shards}) "
        f"for {fraction:.0%}, or pass validation records (data.valid)."
    )
