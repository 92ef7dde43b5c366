"""Small helpers shared across modules: optional imports and lazy exports."""

from __future__ import annotations

import importlib
import importlib.util
import sys

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


def lazy_exports(package: str, exports: dict[str, str]):
    """Returns a package's ``__getattr__`` and ``__dir__`` (PEP 562) that import each
    exported name from its module on first use.

    Importing a package must not start TensorFlow or Keras: the backend is chosen
    by ``shopee_tpu.connect()`` and TensorFlow may not be installed at all.

    Args:
        package: The package's ``__name__``, for the error message and the cache.
        exports: ``{name: absolute module path}``.
    """

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
