"""Pixel CSVs -> records: Kaggle's Fashion-MNIST and Digit Recognizer layout.

One image per row: an optional label column (``label``, ``category``, ``class`` or
``target``), an optional id column (``id``, ``ImageId``, ``image_id``) and the
pixels, ``pixel1 .. pixelN`` (or ``pixel0 ..``) in row-major order, channels last
for colour. A test CSV has no label column. The image shape is given
(``28x28``, ``32x32x3``) or, for grey images, inferred from a square count.

A row whose values are not pixels (text, a fraction, an empty value, a number
outside 0..255) is skipped and recorded in the manifest as ``FILE line N`` with
the reason, as the writer records a corrupt image file; a row with another
number of fields than the header stops the read with one line naming it.
Without an id column an image's id is its row number, counted from 1 (Digit
Recognizer's ``ImageId``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from shopee_tpu.data.write import arrays, sources

__all__ = ["PixelTable", "read_pixels_csv", "write_pixels_csv", "parse_shape"]

ID_COLUMNS = ("id", "imageid", "image_id")
_CHUNK = 8192  # rows parsed at a time (about 50 MB of int64 at 784 pixels)
_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


@dataclass
class PixelTable:
    """What a pixel CSV holds.

    ``images`` is uint8 ``N x H x W`` (grey) or ``N x H x W x C``; ``labels``
    the label column as text (``None`` without one); ``ids`` one per row;
    ``lines`` each row's line in the file; ``bad`` maps a row index to why its
    pixels are unusable (those rows hold zeros).
    """

    images: np.ndarray
    labels: np.ndarray | None
    ids: list[str]
    lines: np.ndarray
    bad: dict[int, str]


def parse_shape(shape) -> tuple[int, ...] | None:
    """``"28x28"``, ``"32x32x3"``, ``(28, 28)`` or ``None`` -> a tuple (or None)."""
    if shape is None:
        return None
    parts = shape.lower().split("x") if isinstance(shape, str) else list(shape)
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) not in (2, 3) or min(dims) < 1 or (len(dims) == 3 and dims[2] != 3):
        raise ValueError(
            f"shape {shape!r}: give rows x columns (28x28) or rows x columns x 3"
        )
    return dims


def _columns(csv: str, header: list[str], test: bool):
    """``(label, id, pixel columns)`` by name, checked."""
    lower = {c.lower(): c for c in header}
    label = (
        None
        if test
        else next((lower[c] for c in sources.LABEL_COLUMNS if c in lower), None)
    )
    id_col = next((lower[c] for c in ID_COLUMNS if c in lower), None)
    skip = {c for c in sources.LABEL_COLUMNS if c in lower} | {id_col}
    pixels = [c for c in header if c.lower() not in skip and c != id_col]
    if not pixels:
        raise ValueError(f"{csv}: no pixel columns (columns: {', '.join(header)})")
    if all(_number(c) for c in header):
        raise ValueError(
            f"{csv}: the first line holds numbers, not column names; a pixel CSV "
            "starts with a header (label,pixel1,pixel2,...)"
        )
    return label, id_col, pixels


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _image_shape(csv: str, n_pixels: int, shape) -> tuple[int, ...]:
    shape = parse_shape(shape)
    if shape is None:
        side = math.isqrt(n_pixels)
        if side * side != n_pixels:
            raise ValueError(
                f"{csv}: {n_pixels} pixel columns are not a square count; give the "
                "shape, e.g. --shape 32x32x3 (rows x columns x channels)"
            )
        return side, side
    if math.prod(shape) != n_pixels:
        raise ValueError(
            f"{csv}: shape {'x'.join(map(str, shape))} needs {math.prod(shape)} "
            f"pixel columns, the file has {n_pixels}"
        )
    return shape


def _chunk_pixels(values, columns: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """A chunk's pixels as uint8 (zeros in unusable rows) and, per unusable row
    (index within the chunk), its first problem."""
    import pandas as pd

    if all(dt.kind in "iu" for dt in values.dtypes):
        raw = values.to_numpy()
        if raw.size == 0 or (raw.min() >= 0 and raw.max() <= 255):
            return raw.astype(np.uint8), {}  # the common case: clean integers
    numeric = values.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    empty = values.isna().to_numpy()
    finite = np.isfinite(numeric)
    checks = (
        ("is empty", empty),
        ("is not a number", np.isnan(numeric) & ~empty),
        ("is not a whole number", np.mod(np.where(finite, numeric, 0), 1) != 0),
        ("is outside 0..255", ~np.isnan(numeric) & ((numeric < 0) | (numeric > 255))),
    )
    problems = {int(r): "empty line" for r in np.flatnonzero(empty.all(axis=1))}
    raw = values.to_numpy()
    for what, mask in checks:
        for row, col in zip(*np.nonzero(mask), strict=True):
            if int(row) not in problems:
                shown = "" if what == "is empty" else f" = {raw[row, col]}"
                problems[int(row)] = f"{columns[col]}{shown} {what}"
    numeric[list(problems)] = 0
    return numeric.astype(np.uint8), dict(sorted(problems.items()))


def read_pixels_csv(
    csv: str | os.PathLike, *, shape=None, test: bool = False
) -> PixelTable:
    """Reads a pixel CSV (see the module docstring).

    Args:
        csv: The CSV file.
        shape: Image shape (``"28x28"``, ``(32, 32, 3)``); default: a square of
            grey pixels.
        test: Ignore a label column (an unlabeled set; without one it is anyway).

    Raises:
        ValueError: A row with another number of fields than the header, no
            pixel columns, a pixel count that does not fit the shape, repeated ids
            (one line naming the file and the line).
    """
    import pandas as pd

    csv = os.fspath(csv)
    if not os.path.exists(csv):
        raise FileNotFoundError(f"CSV not found: {csv}")
    header = [str(c) for c in pd.read_csv(csv, nrows=0).columns]
    label, id_col, pixel_cols = _columns(csv, header, test)
    dims = _image_shape(csv, len(pixel_cols), shape)
    text = {c: str for c in (label, id_col) if c}
    chunks, labels, ids, bad = [], [], [], {}
    try:
        reader = pd.read_csv(
            csv, dtype=text, keep_default_na=False, na_values=[""],
            skip_blank_lines=False, chunksize=_CHUNK,
        )  # fmt: skip
        start = 0
        for chunk in reader:
            pixels, problems = _chunk_pixels(chunk[pixel_cols], pixel_cols)
            bad.update({start + r: p for r, p in problems.items()})
            chunks.append(pixels)
            if label:
                labels.extend(chunk[label].fillna("").astype(str))
            if id_col:
                ids.extend(chunk[id_col].fillna("").astype(str))
            start += len(chunk)
    except pd.errors.ParserError as e:
        raise ValueError(f"{csv}: {_parser_problem(e)}") from None
    n = sum(len(c) for c in chunks)
    if n == 0:
        raise ValueError(f"{csv}: no rows")
    images = np.concatenate(chunks).reshape(n, *dims)
    lines = np.arange(n) + 2  # line 1 is the header
    ids = ids if id_col else [str(i + 1) for i in range(n)]
    _check_unique(csv, ids, lines)
    if label:
        for i, value in enumerate(labels):
            if not value.strip() and i not in bad:
                bad[i] = f"{label} is empty"
    return PixelTable(images, np.array(labels) if label else None, ids, lines, bad)


def _check_unique(csv: str, ids: list[str], lines: np.ndarray) -> None:
    first: dict[str, int] = {}
    for i, value in enumerate(ids):
        if value in first:
            raise ValueError(
                f"{csv}: id {value!r} on line {lines[first[value]]} and line "
                f"{lines[i]}; each image needs its own id"
            )
        first[value] = i


def _parser_problem(error) -> str:
    m = _FIELDS.search(str(error))
    if m:
        want, line, saw = m.groups()
        return f"line {line} has {saw} fields, the header has {want}"
    return str(error).strip().splitlines()[-1]


def write_pixels_csv(
    csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shape=None,
    test: bool = False,
    class_names=None,
    label_map=None,
    **options,
) -> dict:
    """Writes records from a pixel CSV; bad rows are recorded as skipped.

    Labels that are all whole numbers are class ids (named by ``class_names``,
    else ``"0"``, ``"1"``, ...); other labels are class names. See
    :func:`read_pixels_csv` for ``shape`` and ``test`` and
    :func:`shopee_tpu.data.write.arrays.write_arrays` for the rest.
    """
    csv = os.fspath(csv)
    table = read_pixels_csv(csv, shape=shape, test=test)
    labels = table.labels
    if labels is not None:
        good = np.ones(len(labels), bool)
        good[list(table.bad)] = False
        if all(re.fullmatch(r"\s*\d+\s*", v) for v in labels[good]):
            labels = np.array([int(v) if g else -1 for v, g in zip(labels, good)])
    name = os.path.basename(csv)
    return arrays.write_pixels(
        table.images,
        labels,
        out_dir,
        class_names=class_names,
        ids=table.ids,
        label_map=label_map,
        where=csv,
        row=lambda i: f"{name} line {table.lines[i]}",
        unusable=table.bad,
        **options,
    )
