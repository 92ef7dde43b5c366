"""Where a notebook runs (Kaggle, Colab, local) and where its inputs are.

The notebooks run unchanged everywhere: on Kaggle their inputs are the datasets,
competitions, kernel outputs and models attached under ``/kaggle/input``; elsewhere
they are the local paths given in the notebook's parameters cell (in Colab, folders
on a mounted Drive).
"""

from __future__ import annotations

import glob
import os
import sys

__all__ = [
    "KAGGLE_INPUT",
    "environment",
    "input_path",
    "on_colab",
    "on_kaggle",
    "records_input",
]

KAGGLE_INPUT = "/kaggle/input"


def on_kaggle() -> bool:
    """True inside a Kaggle kernel (interactive or a pushed run)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or os.path.isdir(KAGGLE_INPUT)


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def environment() -> str:
    """``"kaggle"``, ``"colab"`` or ``"local"``."""
    if on_kaggle():
        return "kaggle"
    return "colab" if on_colab() else "local"


def _find_attached(name: str, root: str) -> str | None:
    """``root/name``, or ``name`` one or two folders down (Kaggle has mounted
    inputs as ``<slug>``, ``competitions/<slug>`` and ``datasets/<owner>/<slug>``)."""
    direct = os.path.join(root, name)
    if os.path.exists(direct):
        return direct
    found = sorted(
        glob.glob(os.path.join(root, "*", name))
        + glob.glob(os.path.join(root, "*", "*", name))
    )
    return found[0] if found else None


def input_path(
    local: str | os.PathLike,
    *,
    kaggle: str | None = None,
    root: str = KAGGLE_INPUT,
    must_exist: bool = True,
) -> str:
    """The path of an input: the attached copy on Kaggle, else the local path.

    Args:
        local: The path outside Kaggle (or an absolute path to use everywhere).
        kaggle: The input's name under ``/kaggle/input`` (a dataset, competition or
            kernel slug, or ``slug/sub/folder``); ``None`` uses ``local`` on Kaggle
            too.
        root: Where Kaggle mounts inputs.
        must_exist: Raise when the chosen path does not exist.

    Raises:
        FileNotFoundError: The input is missing; the message says what was searched
            and how to attach it.
    """
    local = os.fspath(local)
    if kaggle and on_kaggle():
        found = _find_attached(kaggle.strip("/"), root)
        if found:
            return found
        if must_exist and not os.path.exists(local):
            attached = sorted(os.listdir(root)) if os.path.isdir(root) else []
            raise FileNotFoundError(
                f"input {kaggle!r} is not attached: no {root}/{kaggle} (attached: "
                f"{', '.join(attached) or 'nothing'}); add it under Add Input, or "
                "to kernel-metadata.json's dataset/competition/kernel/model_sources"
            )
    if must_exist and not os.path.exists(local):
        raise FileNotFoundError(f"input {local}: no such file or folder")
    return local


def records_input(
    local: str | os.PathLike, *, kaggle: str | None = None, root: str = KAGGLE_INPUT
) -> dict:
    """Train and test records attached as one input (``train/`` and ``test/``
    folders, as ``tfrecords.ipynb`` writes them), in the form
    ``shopee_tpu.demo.prepare_demo_data`` returns.

    Returns:
        ``train_records``, ``test_records`` and ``md5_dict`` (the path of
        ``train_md5.npz`` when the input holds one, else ``None``).
    """
    folder = input_path(local, kaggle=kaggle, root=root)
    paths = {
        "train_records": os.path.join(folder, "train"),
        "test_records": os.path.join(folder, "test"),
    }
    for name, path in paths.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{folder}: no {os.path.basename(path)}/ folder of records ({name})"
            )
    md5 = os.path.join(folder, "train_md5.npz")
    return {**paths, "md5_dict": md5 if os.path.isfile(md5) else None}
