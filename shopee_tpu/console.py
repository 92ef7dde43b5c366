"""What a user sees in a terminal or notebook: progress bars, quiet native logs and
one-line errors.

Progress bars redraw often on a terminal or in a notebook and rarely in a log file
(Kaggle's committed runs, CI), where every redraw is a new line. TensorFlow's C++
INFO and WARNING lines are noise for a user and are hidden unless asked for.

``TF_CPP_MIN_LOG_LEVEL`` hides them once TensorFlow's logging is set up, but not
those printed while ``import tensorflow`` runs: on CPUs where TensorFlow turns its
oneDNN operations on (AMD EPYC with AVX512_BF16, as on Kaggle's GPU and TPU hosts)
abseil writes ``WARNING: All log messages before absl::InitializeLog() ...`` and a
``port.cc`` INFO line to file descriptor 2 before any level applies, twice. So the
import itself runs with descriptor 2 sent to a file; afterwards every line of it
goes on to the real stderr except those of a severity the level hides.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import warnings

__all__ = [
    "progress_bar",
    "known_length",
    "quiet_native_logs",
    "show_native_logs",
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
    "optuna": ("optuna", "tune"),
    "safetensors": ("safetensors", "safetensors"),
    "google": ("google-cloud-storage", "gcs"),
    "tf2onnx": ("tf2onnx", "export"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "ai_edge_litert": ("ai-edge-litert", "export"),
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


_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
_QUIET_LEVEL = "2"  # INFO and WARNING hidden, ERROR and FATAL shown
# glog/abseil lines: severity letter, date, time (abseil's pre-initialisation
# lines carry seconds since the epoch there), thread id, file:line]
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]*\] ")
_ABSL_PREINIT = b"WARNING: All log messages before absl::InitializeLog() is called"
_level_set_here = False  # by quiet_native_logs, so show_native_logs may undo it


def quiet_native_logs() -> None:
    """Hides TensorFlow's C++ INFO and WARNING lines (errors still show), also
    those printed while TensorFlow is imported (see the module docstring).

    ``import shopee_tpu`` calls it. A level the user set is kept, and applies to
    the import's lines too: ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything. Has no
    effect on a TensorFlow imported before it.
    """
    global _level_set_here
    if _LEVEL not in os.environ:
        os.environ[_LEVEL] = _QUIET_LEVEL
        _level_set_here = True
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietImport())


def show_native_logs() -> None:
    """Undoes ``quiet_native_logs`` before TensorFlow is imported (``--verbose``)."""
    global _level_set_here
    if _level_set_here:
        os.environ.pop(_LEVEL, None)
        _level_set_here = False
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietImport)]


def _hidden(line: bytes, level: int) -> bool:
    """Whether a native log line is of a severity ``level`` hides (0 = none)."""
    if line.startswith(_ABSL_PREINIT):
        return level >= 1  # a WARNING that only announces INFO lines
    match = _NATIVE_LINE.match(line)
    return bool(match) and "IWEF".index(match[1].decode()) < level


@contextlib.contextmanager
def _filtered_stderr():
    """Sends file descriptor 2 to a file meanwhile, then passes on its lines but
    those the log level hides; a failed import's lines are passed on too."""
    try:
        level = int(os.environ.get(_LEVEL) or 0)
    except ValueError:
        level = 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not _hidden(line, level))
            if kept:
                os.write(2, kept)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` (whoever asks for it: Keras, tf.data,
    the user) inside ``_filtered_stderr``; then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or "tensorflow" in sys.modules:
            return None
        # The regular finders' spec, with the loader wrapped (this finder is
        # skipped meanwhile: removing it from sys.meta_path during the import
        # system's walk of the list would make the walk skip its neighbour).
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps TensorFlow's own loader (resources, reloads).
        module.__loader__ = module.__spec__.loader = self.loader
        with _filtered_stderr():
            self.loader.exec_module(module)


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
