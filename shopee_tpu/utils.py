"""Small helpers shared across modules: atomic writes, optional imports, paths."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator

TF_INSTALL_HINT = (
    "TensorFlow is needed for this (tf.data input pipelines and TF strategies). "
    "Install it with `pip install shopee_tpu[cpu]` (tensorflow-cpu) or "
    "`pip install shopee_tpu[tf]`; on Kaggle and Colab it is already installed."
)


def require_tensorflow():
    """Imports TensorFlow or raises one ImportError that says how to install it."""
    try:
        return importlib.import_module("tensorflow")
    except ImportError as e:
        raise ImportError(f"{TF_INSTALL_HINT} (import failed: {e})") from e


def require_extra(module: str, extra: str, what: str) -> None:
    """Raises one ImportError naming the extra to install when ``module`` is missing.

    Args:
        module: The importable name, e.g. ``sklearn``.
        extra: The shopee_tpu extra that installs it, e.g. ``demo``.
        what: What needs it, for the message.
    """
    if importlib.util.find_spec(module) is None:
        error = ImportError(
            f"{what} needs the [{extra}] extra ({module} is not installed): "
            f"pip install 'shopee_tpu[{extra}]'"
        )
        error.name = module
        raise error


def is_remote(path: str) -> bool:
    """True for paths that need tf.io.gfile (gs://, s3://, ...)."""
    return "://" in str(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary sibling path; renames it onto ``path`` on success.

    An interrupted write leaves only a ``.tmp-*`` file, never a truncated ``path``.
    Remote (gs://) paths are written through tf.io.gfile with a final rename.
    """
    path = os.fspath(path)
    if is_remote(path):
        tf = require_tensorflow()
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            yield tmp
            tf.io.gfile.rename(tmp, path, overwrite=True)
        finally:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    # Keep the real suffix last: Keras insists on names ending in .weights.h5.
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{os.getpid()}-", suffix=f"-{base}", dir=directory
    )
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (local or gs://)."""
    with atomic_path(path) as tmp:
        if is_remote(tmp):
            tf = require_tensorflow()
            with tf.io.gfile.GFile(tmp, "w") as f:
                f.write(text)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (local or gs://)."""
    with atomic_path(path) as tmp:
        if is_remote(tmp):
            tf = require_tensorflow()
            with tf.io.gfile.GFile(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)


def lazy_exports(package: str, exports: dict[str, str]):
    """Returns a package's ``__getattr__`` and ``__dir__`` (PEP 562) that import each
    exported name from its module on first use.

    Importing a package must not start TensorFlow or Keras: the backend is chosen
    by ``shopee_tpu.connect()`` and TensorFlow may not be installed at all.

    Args:
        package: The package's ``__name__``, for the error message and the cache.
        exports: ``{name: absolute module path}``.
    """
    import sys

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
