"""Where images come from: the Shopee layout, any CSV/DataFrame, or an iterable.

Everything is normalised to one table with columns ``path, label, id, group``
(``label`` is the category string, ``""`` for unlabeled rows) before the writer plans
its shards. Images in a CSV may be named relative to the images folder, or by file
name only, as in the Shopee competition where ``train.csv`` says ``<md5>.jpg`` and the
file sits under ``train/train/train/NN/``: the folder tree is indexed once and each
name is looked up in it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

__all__ = [
    "PATH_COLUMNS",
    "LABEL_COLUMNS",
    "GROUP_COLUMNS",
    "read_table",
    "normalise_table",
    "resolve_paths",
    "fill_labels_from_folders",
    "build_label_map",
    "load_label_map",
    "class_names",
    "check_labels",
]

PATH_COLUMNS = ("path", "filename", "file", "image", "image_path")
LABEL_COLUMNS = ("label", "category", "class", "target")
GROUP_COLUMNS = ("group", "product", "product_id")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_table(csv: str | os.PathLike):
    """Reads a CSV with every column as text (so category ``"03"`` stays ``"03"``)."""
    import pandas as pd

    csv = os.fspath(csv)
    if not os.path.exists(csv):
        raise FileNotFoundError(f"CSV not found: {csv}")
    return pd.read_csv(csv, dtype=str, keep_default_na=False)


def _pick(columns, candidates, what: str, where: str, required: bool):
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise ValueError(
            f"{where}: missing column {candidates[0]!r} ({what}; accepted names: "
            f"{', '.join(candidates)}); columns found: {', '.join(map(str, columns))}"
        )
    return None


def normalise_table(table, *, test: bool, where: str = "DataFrame"):
    """Maps a CSV/DataFrame onto columns ``path, label, id, group`` (all text).

    Args:
        table: A DataFrame with a path column (``path`` or ``filename``, ...), a label
            column (``label`` or ``category``, ...; ignored when ``test``), and
            optionally ``id`` and a group column (``group``, ``product`` or
            ``product_id``).
        test: Unlabeled set: any label column is a placeholder and is dropped.
        where: Name of the source for error messages (the CSV's path).

    Raises:
        ValueError: A needed column is missing (the message names it and ``where``).
    """
    import pandas as pd

    cols = list(table.columns)
    path_col = _pick(cols, PATH_COLUMNS, "image path or file name", where, True)
    label_col = _pick(cols, LABEL_COLUMNS, "category", where, not test)
    group_col = _pick(cols, GROUP_COLUMNS, "group", where, False)
    paths = table[path_col].astype(str)
    out = pd.DataFrame({"path": paths.to_numpy()})
    if test or label_col is None:
        out["label"] = ""
    else:
        out["label"] = _as_text(table[label_col])
    ids = table["id"] if "id" in cols else paths.map(os.path.basename)
    out["id"] = ids.astype(str).to_numpy()
    out["group"] = _as_text(table[group_col]) if group_col else ""
    return out


def _as_text(column):
    """Text labels; integer-valued floats (pandas upcasts) lose their ``.0``."""
    import pandas as pd

    def text(v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return pd.Series(column).map(text).to_numpy()


def _index_tree(root: str) -> dict[str, list[str]]:
    """Maps each image file name under ``root`` to its paths (sorted walk)."""
    index: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES):
                index.setdefault(name, []).append(os.path.join(dirpath, name))
    return index


def resolve_paths(table, images: str | os.PathLike | None):
    """Finds every image on disk (absolute paths, nested folders searched).

    A path is tried as given (absolute or relative to ``images``); failing that, its
    file name is looked up anywhere under ``images``. When several files share the
    name, the one inside a folder named like the row's category wins. Rows whose
    image is nowhere keep the path as given (the writer reports them as missing).

    Returns:
        A copy of ``table`` with absolute paths.
    """
    table = table.copy()
    root = os.fspath(images) if images is not None else None
    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"images folder not found: {root}")
    index: dict[str, list[str]] | None = None
    paths = []
    for path, label in zip(table["path"], table["label"], strict=True):
        found = None
        direct = (
            path if os.path.isabs(path) or root is None else os.path.join(root, path)
        )
        if os.path.isfile(direct):
            found = direct
        elif root is not None:
            if index is None:
                index = _index_tree(root)
            matches = index.get(os.path.basename(path), [])
            if matches:
                named = [
                    m for m in matches if os.path.basename(os.path.dirname(m)) == label
                ]
                found = (named or matches)[0]
        # A missing image keeps its given path; the writer reports it as missing.
        paths.append(os.path.abspath(found or direct))
    table["path"] = paths
    return table


def fill_labels_from_folders(table):
    """Rows with an empty label take their image's folder name (Shopee ``NN/``)."""
    table = table.copy()
    table["label"] = [
        lab or os.path.basename(os.path.dirname(p))
        for lab, p in zip(table["label"], table["path"], strict=True)
    ]
    return table


def _sort_key(values: Iterable[str]):
    values = list(values)
    if values and all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def build_label_map(labels: Iterable[str]) -> dict[str, int]:
    """Class ids for categories in sorted order (numeric order for digit strings)."""
    unique = {str(v) for v in labels if str(v) != ""}
    return {name: i for i, name in enumerate(_sort_key(unique))}


def class_names(label_map: dict[str, int]) -> list[str]:
    """Category names in class-id order, from a ``{category: class_id}`` map."""
    return [k for k, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


def load_label_map(
    label_map: Mapping | str | os.PathLike | None,
) -> dict[str, int] | None:
    """Accepts a mapping, a JSON label map file, or a ``manifest.json`` (its map)."""
    if label_map is None:
        return None
    if isinstance(label_map, Mapping):
        mapping = label_map
    else:
        path = os.fspath(label_map)
        if os.path.isdir(path):
            path = os.path.join(path, "manifest.json")
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        if "label_map" in mapping and isinstance(mapping["label_map"], Mapping):
            mapping = mapping["label_map"]
    try:
        return {str(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"label map must map category -> integer id: {e}") from None


def check_labels(
    labels: Iterable[str], label_map: Mapping[str, int], where: str
) -> None:
    """Raises ValueError listing the first few labels missing from ``label_map``."""
    missing: list[str] = []
    count = 0
    for v in labels:
        if v not in label_map:
            count += 1
            if v not in missing and len(missing) < 5:
                missing.append(v)
    if count:
        known = ", ".join(list(label_map)[:10])
        raise ValueError(
            f"{where}: {count} rows have labels not in the label map, e.g. "
            f"{', '.join(repr(m) for m in missing)} (label map has: {known}"
            f"{', ...' if len(label_map) > 10 else ''})"
        )
