"""A folder per class -> records: the layout of ``keras.utils.
image_dataset_from_directory``, torchvision's ``ImageFolder`` and most Kaggle image
datasets; and a flat folder of test images.

``DIR/<class>/**/<image>``: every subfolder of ``DIR`` is a class (named by the
folder, numbered as the rest of the library numbers categories: numeric names in
numeric order, others sorted), and every image below it, at any depth, is one of
its examples; a class folder without images is still a class, as Keras counts it.
An image's id is its path below ``DIR`` (``shirt/001.jpg``: file names repeat
between classes). ``DIR/<image>`` with no subfolders is an unlabeled (test) set
whose ids are the file names, what a submission names.

Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and macOS's
``__MACOSX`` are not part of a dataset and are passed over. Files without an image
suffix (a ``README.txt``, a ``labels.csv``) are counted and named in one line, not
written. An image file that cannot be decoded is skipped and listed in the
manifest with the reason, as for any source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shopee_tpu.data.write import sources
from shopee_tpu.data.write.records import write_records

__all__ = [
    "FolderScan",
    "scan_folders",
    "describe_scan",
    "write_records_from_folders",
]

_PASSED_OVER = ("__MACOSX",)


@dataclass
class FolderScan:
    """What a folder holds: the table to write, the classes, what is left out."""

    table: object  # pandas DataFrame: path, label, id, group
    classes: list[str]
    test: bool
    not_images: list[str] = field(default_factory=list)  # relative paths
    empty_classes: list[str] = field(default_factory=list)


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _PASSED_OVER


def _files(root: str, folder: str) -> tuple[list[str], list[str]]:
    """Images and other files below ``folder``, as sorted paths relative to
    ``root`` (hidden files and folders left out)."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if not _visible(name):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            rel = rel.replace(os.sep, "/")
            if name.lower().endswith(sources.IMAGE_SUFFIXES):
                images.append(rel)
            else:
                others.append(rel)
    return images, others


def scan_folders(root: str | os.PathLike, *, test: bool | None = None) -> FolderScan:
    """Finds the classes and images of a class-folder tree (or a test folder).

    Args:
        root: The folder.
        test: ``None``: labelled when ``root`` has subfolders, unlabeled when its
            images sit in it directly. ``True``: every image below ``root`` is an
            unlabeled test image (ids: paths below ``root``).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: Images beside class folders, no images at all, or ``test=False``
            for a folder without class folders.
    """
    import pandas as pd

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    entries = sorted(e for e in os.listdir(root) if _visible(e))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if test or not subdirs:
        if test is False:
            raise ValueError(
                f"{root}: no class folders (one subfolder per class, images inside)"
            )
        images, others = _files(root, root)
        table = pd.DataFrame({"path": [os.path.join(root, p) for p in images]})
        table["label"], table["id"], table["group"] = "", images, ""
        scan = FolderScan(table, [], True, others)
    else:
        scan = _class_scan(root, subdirs, entries)
    if len(scan.table) == 0:
        raise ValueError(f"{root}: no images ({', '.join(sources.IMAGE_SUFFIXES)})")
    return scan


def _class_scan(root: str, classes: list[str], entries: list[str]) -> FolderScan:
    import pandas as pd

    loose = [
        e
        for e in entries
        if e not in classes and e.lower().endswith(sources.IMAGE_SUFFIXES)
    ]
    if loose:
        raise ValueError(
            f"{root}: {_count(loose, 'image')} beside the class folders (e.g. "
            f"{loose[0]}); "
            "move them into their class folder, or point at a folder of test images"
        )
    rows, others, empty = [], [e for e in entries if e not in classes], []
    for name in classes:
        images, not_images = _files(root, os.path.join(root, name))
        others += not_images
        if not images:
            empty.append(name)
        rows += [(os.path.join(root, p), name, p, "") for p in images]
    table = pd.DataFrame(rows, columns=["path", "label", "id", "group"])
    return FolderScan(table, classes, False, others, empty)


def write_records_from_folders(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test: bool | None = None,
    label_map=None,
    verbose: bool = True,
    **options,
) -> dict:
    """Writes records from a folder per class, or a folder of test images.

    Args:
        root: ``DIR/<class>/<images>`` or ``DIR/<images>`` (see the module
            docstring).
        out_dir: Output folder for the shards and ``manifest.json``.
        test: See :func:`scan_folders`.
        label_map: Class ids to reuse (a training set's manifest or label map);
            by default every class folder in sorted order.
        verbose: A progress bar, and one line for files that are not images and
            class folders without images.
        **options: As in :func:`shopee_tpu.data.write.records.write_records`.

    Returns:
        The manifest (see :func:`shopee_tpu.data.read_manifest`).
    """
    scan = scan_folders(root, test=test)
    if label_map is None and not scan.test:
        label_map = sources.build_label_map(scan.classes)
    if verbose:
        for line in describe_scan(os.fspath(root), scan):
            print(line)
    return write_records(
        scan.table,
        out_dir,
        test=scan.test,
        label_map=label_map,
        verbose=verbose,
        _where=os.fspath(root),
        **options,
    )


def describe_scan(root: str, scan: FolderScan) -> list[str]:
    """One line each for files left out as not images and for empty classes."""
    lines = []
    if scan.not_images:
        lines.append(
            f"{root}: {_count(scan.not_images, 'file')} without an image suffix "
            f"not written (e.g. {scan.not_images[0]})"
        )
    if scan.empty_classes:
        lines.append(
            f"{root}: class folders without images: {', '.join(scan.empty_classes)}"
        )
    return lines


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
