"""Files on a local disk or in a bucket (``gs://``, any ``tf.io.gfile`` scheme),
through one set of functions, with atomic writes.

Kaggle's TPU hosts read records and write runs in Google Cloud Storage as often as
on their local disk. Local paths use the standard library; remote ones go through
``tf.io.gfile``, imported only when a remote path is met. A write goes to a
temporary sibling first and is renamed onto the target, so an interrupted write
leaves the old file (or none), never half of a new one.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from shopee_tpu.utils import require_tensorflow

__all__ = [
    "is_remote",
    "join",
    "exists",
    "isdir",
    "glob",
    "makedirs",
    "listdir",
    "remove",
    "rename",
    "read_text",
    "read_json",
    "atomic_path",
    "write_text",
    "write_bytes",
    "write_json",
    "put",
    "local_copy",
]


def is_remote(path: str | os.PathLike) -> bool:
    """True for paths that need ``tf.io.gfile`` (``gs://``, ``s3://``, ...)."""
    return "://" in os.fspath(path)


def _gfile():
    return require_tensorflow().io.gfile


def join(folder: str | os.PathLike, name: str) -> str:
    folder = os.fspath(folder)
    return (
        f"{folder.rstrip('/')}/{name}"
        if is_remote(folder)
        else os.path.join(folder, name)
    )


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def glob(pattern: str) -> list[str]:
    """The paths matching a ``*``/``?``/``[...]`` pattern, in no set order."""
    return list(_gfile().glob(pattern)) if is_remote(pattern) else _glob.glob(pattern)


def makedirs(path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    path = os.fspath(path)
    if is_remote(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def remove(path: str | os.PathLike) -> None:
    path = os.fspath(path)
    _gfile().remove(path) if is_remote(path) else os.remove(path)


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves ``source`` onto ``target``, replacing it."""
    source, target = os.fspath(source), os.fspath(target)
    if is_remote(source):
        _gfile().rename(source, target, overwrite=True)
    else:
        os.replace(source, target)


def read_text(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path: str | os.PathLike, *, what: str = "") -> Any:
    """Reads a JSON file; a missing or damaged file is one error naming the path
    (and ``what`` it should be)."""
    path = os.fspath(path)
    if not exists(path):
        raise FileNotFoundError(f"{path}: missing{'; ' + what if what else ''}")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary sibling path; renames it onto ``path`` on success.

    An interrupted write leaves only a ``.tmp-*`` file, never a truncated ``path``.
    """
    path = os.fspath(path)
    if is_remote(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            yield tmp
            rename(tmp, path)
        finally:
            if exists(tmp):
                remove(tmp)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # Keep the real suffix last: Keras insists on names ending in .weights.h5.
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{os.getpid()}-",
        suffix=f"-{os.path.basename(path)}",
        dir=directory,
    )
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if is_remote(tmp):
            with _gfile().GFile(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 1) -> None:
    """Writes ``value`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def put(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a local file to ``target`` (local or remote), replacing it."""
    local, target = os.fspath(local), os.fspath(target)
    if is_remote(target):
        _gfile().copy(local, target, overwrite=True)
    else:
        shutil.copyfile(local, target)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding ``path``'s content (itself when it is local), for
    readers that need a real file (h5py, Keras)."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        _gfile().copy(path, local, overwrite=True)
        yield local
