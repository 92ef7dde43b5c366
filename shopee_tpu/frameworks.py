"""Who imported Keras first: the answer ``connect()`` gives on a TPU VM.

On Kaggle's TPU VM only JAX sees the TPU (the image's TensorFlow is
``tensorflow-cpu``), and Keras fixes its backend when it is first imported
(``import tensorflow`` imports it too). ``connect()`` can choose JAX only while
neither is imported; when something imported one earlier, its error names the line
that did, so the user knows what to move after ``connect()``.

``import shopee_tpu`` calls ``watch()``; it records nothing but the first of the
two imports.
"""

from __future__ import annotations

import importlib.abc
import inspect
import os
import sys

__all__ = ["watch", "first_import"]

WATCHED = ("keras", "tensorflow")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_first: list[str] = []  # how the first of WATCHED was imported, once known


def watch() -> None:
    """Starts recording where keras or tensorflow is first imported."""
    if _first or any(isinstance(f, _FirstImport) for f in sys.meta_path):
        return
    # sys.modules keeps import order, and a package's first submodules enter it
    # before the package is complete: after `import tensorflow` tensorflow.* comes
    # before the keras it imports, after `import keras` the other way round.
    loaded = [n for n in list(sys.modules) if n.split(".")[0] in WATCHED][:1]
    loaded = [name.split(".")[0] for name in loaded]
    if loaded:
        _first.append(f"{loaded[0]} was imported before shopee_tpu")
    else:
        sys.meta_path.insert(0, _FirstImport())


def first_import() -> str | None:
    """E.g. ``"keras was imported at /tmp/ipykernel_7/3.py:2"``; ``None`` when
    neither is imported (or ``watch()`` never ran)."""
    return _first[0] if _first else None


class _FirstImport(importlib.abc.MetaPathFinder):
    # It stays on sys.meta_path: removing a finder while the import system walks
    # the list would make it skip the next one.
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and not _first:
            _first.append(f"{name} was imported {_importer()}")
        return None  # the regular finders import it


def _importer() -> str:
    """The innermost caller outside the import machinery and the frameworks,
    and the outermost shopee_tpu module in between, if any."""
    ours = None
    frame = inspect.currentframe()
    while frame is not None:
        file = frame.f_code.co_filename
        frame_module = frame.f_globals.get("__name__", "")
        if file.startswith(_PACKAGE):
            if frame_module != __name__:
                ours = frame_module
        elif not (
            file.startswith("<frozen")
            or frame_module.split(".")[0] in (*WATCHED, "importlib")
        ):
            where = f"at {file}:{frame.f_lineno}"
            return f"{where} (through {ours})" if ours else where
        frame = frame.f_back
    return f"by {ours}" if ours else "by an unknown caller"
