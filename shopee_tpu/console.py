"""What a user sees in a terminal or notebook: progress bars, quiet native logs and
one-line errors.

Progress bars redraw often on a terminal or in a notebook and rarely in a log file
(Kaggle's committed runs, CI), where every redraw is a new line. TensorFlow's C++
INFO and WARNING lines are noise for a user and are hidden unless asked for.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "progress_bar",
    "known_length",
    "quiet_native_logs",
    "one_line_warnings",
    "error_line",
    "EXTRAS",
]

# Optional imports: module -> (package to install, the shopee_tpu extra holding it).
EXTRAS = {
    "sklearn": ("scikit-learn", "demo"),
    "skimage": ("scikit-image", "bench"),
    "tensorflow": ("tensorflow-cpu", "cpu"),
    "jax": ("jax", "jax"),
    "jaxlib": ("jax", "jax"),
    "kaggle": ("kaggle", "kaggle"),
    "slugify": ("python-slugify", "kaggle"),
    "keras_hub": ("keras-hub", "hub"),
    "bson": ("pymongo", "cdiscount"),
    "pymongo": ("pymongo", "cdiscount"),
}


def _interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(
    total: int | None = None,
    desc: str = "",
    *,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
):
    """A tqdm bar with a total (so it shows a rate and an ETA) that suits logs.

    Args:
        total: Items expected; ``None`` when unknown (no ETA).
        desc: Label in front of the bar.
        unit: What is counted (``img``, ``batch``...); the rate reads ``unit/s``.
        disable: No bar at all (``verbose=False``).
        leave: Keep the finished bar on screen.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        leave=leave,
        mininterval=0.1 if _interactive() else 30.0,
        dynamic_ncols=True,
    )


def known_length(items) -> int | None:
    """How many items (batches) an iterable will yield, when that is known without
    iterating: ``len()``, or a ``tf.data`` dataset's cardinality."""
    try:
        return len(items)
    except TypeError:
        pass
    cardinality = getattr(items, "cardinality", None)
    if cardinality is None:
        return None
    try:
        n = int(cardinality())
    except Exception:  # not a tf.data dataset after all
        return None
    return n if n >= 0 else None  # -1 infinite, -2 unknown


def quiet_native_logs() -> None:
    """Hides TensorFlow's C++ INFO and WARNING lines (errors still show).

    Must run before TensorFlow is imported; a level the user set is kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def one_line_warnings(prefix: str) -> None:
    """Shows the package's own warnings as one line, ``<prefix>: note: ...``.

    They are advice to the user (a hold-out that had to take whole shards, a
    validation split that looks too easy), so the source line Python prints with a
    warning is noise on the command line. Other libraries' warnings are unchanged.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        ours = category.__module__.startswith("shopee_tpu.") or os.path.abspath(
            filename
        ).startswith(package)
        if not ours:
            return default(message, category, filename, lineno, file, line)
        print(f"{prefix}: note: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def error_line(error: BaseException) -> str:
    """The message for an error a user caused: what went wrong and what to do.

    A missing optional module names the extra that installs it.
    """
    if isinstance(error, ImportError):
        root = (getattr(error, "name", None) or "").split(".")[0]
        if root in EXTRAS and "pip install" not in str(error):
            package, extra = EXTRAS[root]
            return (
                f"{package} is not installed ({error}); it comes with the [{extra}] "
                f"extra: pip install 'shopee_tpu[{extra}]'"
            )
    text = str(error).strip() or type(error).__name__
    return text
