"""Submission formats: one table (``FORMATS``), their writers and validators.

A submission that Kaggle rejects (or scores 0) wastes a day's quota, so the writers
validate before writing, write atomically, and the validators name every problem:
missing, extra or duplicate ids (with the ids), bad header or format, and categories
the label map does not know.

- ``shopee`` (Shopee Product Detection): ``filename,category``; category as two
  digits (``03``); every ``test.csv`` filename exactly once.
- ``named``: ``filename,category`` with the class names of the label map as they
  are (``Ankle boot``), for classes that are not Shopee's numbers; with
  ``probability=True`` a third column, the probability of that class.
- ``cdiscount``: ``_id,category_id``; one row per product; ``category_id`` is the
  original Cdiscount id (e.g. ``1000010653``) mapped back from our class id by the
  label map.

``auto`` (what ``predict`` does unless told) picks ``shopee`` when every class is a
number that fits two digits and no probability is asked for, else ``named``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shopee_tpu import fs

__all__ = [
    "SubmissionError",
    "SubmissionFormat",
    "FORMATS",
    "AUTO",
    "FORMAT_CHOICES",
    "resolve_format",
    "write_image_submission",
    "write_named_submission",
    "validate_named_submission",
    "named_frame",
    "shopee_frame",
    "cdiscount_frame",
    "write_shopee_submission",
    "write_cdiscount_submission",
    "validate_shopee_submission",
    "validate_cdiscount_submission",
    "class_ids",
    "output_stem",
]

_SHOW = 10  # ids named per problem in a message
PROBABILITY = "probability"  # the optional third column of the named format


@dataclass(frozen=True)
class SubmissionFormat:
    """One submission layout: its columns, what a category looks like, and
    whether a row is an image or a product (images aggregated by group)."""

    name: str
    columns: tuple[str, str]  # id, category
    pattern: str  # a valid category, as a regular expression
    per_product: bool
    probability: bool  # may carry a probability column
    summary: str


FORMATS: dict[str, SubmissionFormat] = {
    f.name: f
    for f in (
        SubmissionFormat(
            "shopee", ("filename", "category"), r"\d{2}", False, False,
            "filename,category with two-digit category numbers (Shopee)",
        ),
        SubmissionFormat(
            "named", ("filename", "category"), r".*\S.*", False, True,
            "filename,category with the class names [,probability]",
        ),
        SubmissionFormat(
            "cdiscount", ("_id", "category_id"), r"\d+", True, False,
            "_id,category_id, one row per product (Cdiscount)",
        ),
    )
}  # fmt: skip
AUTO = "auto"
FORMAT_CHOICES = (AUTO, *FORMATS)


def resolve_format(
    format: str, label_map: Mapping, *, probability: bool = False
) -> SubmissionFormat:
    """The format ``format`` names; ``auto``: ``shopee`` when every class is a
    number 0..99 and no probability is asked for, else ``named``.

    Raises:
        ValueError: An unknown name, or a probability for a format without one.
    """
    if format == AUTO:
        numbers = all(str(k).isdigit() and int(k) <= 99 for k in label_map)
        format = "shopee" if numbers and label_map and not probability else "named"
    if format not in FORMATS:
        raise ValueError(
            f"format must be one of {', '.join(FORMAT_CHOICES)}, got {format!r}"
        )
    names = [k for k in label_map if not str(k).isdigit()]
    if format == "shopee" and names:
        raise ValueError(
            f"the shopee format takes classes that are numbers; these have names "
            f"(e.g. {names[0]!r}): write the named format (--format named or auto)"
        )
    if probability and not FORMATS[format].probability:
        raise ValueError(
            f"the {format} format has exactly the columns "
            f"{','.join(FORMATS[format].columns)}; a probability column comes "
            "with the named format (--format named)"
        )
    return FORMATS[format]


class SubmissionError(ValueError):
    """A submission is malformed; ``problems`` lists each issue, ids named."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where}: {len(problems)} problem(s): " + "; ".join(problems))


def class_ids(predictions) -> np.ndarray:
    """Class ids from probabilities ``[n, classes]`` (argmax) or ids ``[n]``."""
    p = np.asarray(predictions)
    if p.ndim == 2:
        return p.argmax(axis=1)
    if p.ndim == 1 and (p.dtype.kind in "iu" or np.all(np.mod(p, 1) == 0)):
        return p.astype(np.int64)
    raise ValueError(
        f"predictions must be probs [n, classes] or class ids [n], got {p.shape}"
    )


def _categories(label_map: Mapping, ids: np.ndarray) -> list[str]:
    inverse = {int(v): str(k) for k, v in label_map.items()}
    bad = sorted({int(i) for i in ids if int(i) not in inverse})
    if bad:
        raise ValueError(
            f"class ids {bad[:_SHOW]} are not in the label map ({len(inverse)} classes)"
        )
    return [inverse[int(i)] for i in ids]


def _two_digits(category: str) -> str:
    try:
        value = int(category)
    except ValueError:
        raise ValueError(
            f"Shopee category {category!r} is not a number; for classes with names "
            "write the named format (format='named', --format named)"
        ) from None
    if not 0 <= value <= 99:
        raise ValueError(f"Shopee category {category!r} does not fit two digits")
    return f"{value:02d}"


def shopee_frame(ids: Sequence[str], predictions, label_map: Mapping) -> pd.DataFrame:
    """The ``filename,category`` frame; categories come from the label map."""
    cats = _categories(label_map, class_ids(predictions))
    if len(cats) != len(ids):
        raise ValueError(f"{len(ids)} ids for {len(cats)} predictions")
    return pd.DataFrame(
        {"filename": [str(i) for i in ids], "category": [_two_digits(c) for c in cats]}
    )


def named_frame(
    ids: Sequence[str], predictions, label_map: Mapping, *, probability: bool = False
) -> pd.DataFrame:
    """The ``filename,category[,probability]`` frame with the class names.

    ``probability`` needs probabilities ``[n, classes]``: the chosen class's.
    """
    chosen = class_ids(predictions)
    cats = _categories(label_map, chosen)
    if len(cats) != len(ids):
        raise ValueError(f"{len(ids)} ids for {len(cats)} predictions")
    df = pd.DataFrame({"filename": [str(i) for i in ids], "category": cats})
    if probability:
        p = np.asarray(predictions)
        if p.ndim != 2:
            raise ValueError("a probability column needs probabilities [n, classes]")
        df[PROBABILITY] = np.round(p[np.arange(len(p)), chosen].astype(float), 6)
    return df


def cdiscount_frame(
    product_ids: Sequence, predictions, label_map: Mapping
) -> pd.DataFrame:
    """The ``_id,category_id`` frame with original Cdiscount category ids."""
    cats = _categories(label_map, class_ids(predictions))
    if len(cats) != len(product_ids):
        raise ValueError(f"{len(product_ids)} ids for {len(cats)} predictions")
    return pd.DataFrame({"_id": [str(i) for i in product_ids], "category_id": cats})


def _expected(expected, column: str) -> list[str] | None:
    """Expected ids from a CSV path (its ``column`` or first column), a frame or a
    list."""
    if expected is None:
        return None
    if isinstance(expected, str | os.PathLike):
        expected = pd.read_csv(expected, dtype=str, keep_default_na=False)
    if isinstance(expected, pd.DataFrame):
        col = column if column in expected.columns else expected.columns[0]
        return expected[col].astype(str).tolist()
    return [str(i) for i in expected]


def _name(items) -> str:
    items = list(items)
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(repr(i) for i in items[:_SHOW]) + more


def _validate(
    submission,
    fmt: SubmissionFormat,
    *,
    expected,
    allowed: set[str] | None,
) -> pd.DataFrame:
    where = (
        str(submission) if isinstance(submission, str | os.PathLike) else "submission"
    )
    if isinstance(submission, str | os.PathLike):
        df = pd.read_csv(submission, dtype=str, keep_default_na=False)
    else:
        df = submission.astype(str)
    id_col, cat_col = columns = fmt.columns
    pattern = fmt.pattern
    headers = [list(columns)] + [[*columns, PROBABILITY]] * fmt.probability
    if list(df.columns) not in headers:
        want = " or ".join(",".join(h) for h in headers)
        raise SubmissionError(
            where, [f"header must be {want}, got {','.join(df.columns)}"]
        )
    problems = []
    ids = df[id_col].tolist()
    empty = [i + 2 for i, v in enumerate(ids) if not v.strip()]
    if empty:
        problems.append(f"empty {id_col} on line(s) {_name(empty)}")
    counts = df[id_col].value_counts()
    dup = counts[counts > 1]
    if len(dup):
        problems.append(
            f"duplicate ids ({len(dup)}): " + _name(f"{k} x{v}" for k, v in dup.items())
        )
    bad = df[~df[cat_col].str.fullmatch(pattern)]
    if len(bad):
        problems.append(
            f"bad {cat_col} format ({len(bad)}, expected /{pattern}/): "
            + _name(f"{i}={c}" for i, c in zip(bad[id_col], bad[cat_col], strict=True))
        )
    if allowed is not None:
        unknown = df[df[cat_col].str.fullmatch(pattern) & ~df[cat_col].isin(allowed)]
        if len(unknown):
            problems.append(
                f"{cat_col} not in the label map ({len(unknown)}): "
                + _name(
                    f"{i}={c}"
                    for i, c in zip(unknown[id_col], unknown[cat_col], strict=True)
                )
            )
    if PROBABILITY in df.columns:
        problems += _probability_problems(df, id_col)
    want = _expected(expected, id_col)
    if want is not None:
        have, wanted = set(ids), set(want)
        missing = [i for i in want if i not in have]
        extra = [i for i in dict.fromkeys(ids) if i not in wanted]
        if missing:
            problems.append(f"missing ids ({len(missing)}): {_name(missing)}")
        if extra:
            problems.append(f"extra ids ({len(extra)}): {_name(extra)}")
    if problems:
        raise SubmissionError(where, problems)
    return df


def _probability_problems(df: pd.DataFrame, id_col: str) -> list[str]:
    value = pd.to_numeric(df[PROBABILITY], errors="coerce")
    bad = df[~value.between(0, 1)]
    if not len(bad):
        return []
    return [
        f"{PROBABILITY} not a number in 0..1 ({len(bad)}): "
        + _name(f"{i}={v}" for i, v in zip(bad[id_col], bad[PROBABILITY], strict=True))
    ]


def validate_shopee_submission(
    submission, expected=None, label_map=None
) -> pd.DataFrame:
    """Checks a Shopee submission (path or frame); returns it or raises
    ``SubmissionError`` naming the problems.

    Args:
        submission: CSV path or DataFrame.
        expected: The test ids: ``test.csv`` path (its ``filename`` column), a frame
            or a list. Every one must appear exactly once, and no others.
        label_map: ``{category: class_id}``; categories outside it are rejected.
    """
    allowed = None if label_map is None else {_two_digits(k) for k in label_map}
    return _validate(submission, FORMATS["shopee"], expected=expected, allowed=allowed)


def validate_named_submission(
    submission, expected=None, label_map=None
) -> pd.DataFrame:
    """Checks a named submission (``filename,category[,probability]``); see
    ``validate_shopee_submission``. Categories must be the label map's names, a
    probability a number in 0..1."""
    allowed = None if label_map is None else {str(k) for k in label_map}
    return _validate(submission, FORMATS["named"], expected=expected, allowed=allowed)


def validate_cdiscount_submission(
    submission, expected=None, label_map=None
) -> pd.DataFrame:
    """Checks a Cdiscount submission; see ``validate_shopee_submission``.

    ``expected`` is the product ids (e.g. ``sample_submission.csv``, ``_id`` column).
    """
    allowed = None if label_map is None else {str(k) for k in label_map}
    return _validate(
        submission, FORMATS["cdiscount"], expected=expected, allowed=allowed
    )


def output_stem(out: str) -> str:
    """``out`` without ``.csv``: the files written beside a submission (its
    probabilities, a stacker, a report) are named ``<stem>.<what>``."""
    return out[: -len(".csv")] if out.endswith(".csv") else out


def _write(path, df: pd.DataFrame) -> None:
    """Writes atomically; ``path=None`` writes nothing (validate only, as on a
    host that is not the chief of several)."""
    if path is not None:
        fs.write_text(path, df.to_csv(index=False, lineterminator="\n"))


def write_shopee_submission(
    path, ids: Sequence[str], predictions, label_map: Mapping, *, expected=None
) -> pd.DataFrame:
    """Validates and atomically writes ``filename,category``.

    Args:
        path: Output CSV (``None``: validate only, as on a host that is not the
            chief of several).
        ids: Test filenames, one per prediction row.
        predictions: Probabilities ``[n, classes]`` or class ids ``[n]``.
        label_map: ``{category: class_id}`` of the training records.
        expected: Optional test ids (``test.csv``) that must each appear once.
    """
    df = shopee_frame(ids, predictions, label_map)
    validate_shopee_submission(df, expected, label_map)
    _write(path, df)
    return df


def write_named_submission(
    path,
    ids: Sequence[str],
    predictions,
    label_map: Mapping,
    *,
    probability: bool = False,
    expected=None,
) -> pd.DataFrame:
    """Validates and atomically writes ``filename,category[,probability]`` with the
    class names; the arguments are those of ``write_shopee_submission``."""
    df = named_frame(ids, predictions, label_map, probability=probability)
    validate_named_submission(df, expected, label_map)
    _write(path, df)
    return df


def write_image_submission(
    path,
    ids: Sequence[str],
    predictions,
    label_map: Mapping,
    *,
    format: str = AUTO,
    probability: bool = False,
    expected=None,
) -> pd.DataFrame:
    """Writes a one-row-per-image submission: ``shopee`` or ``named``, or the one
    ``auto`` picks for the label map (see :func:`resolve_format`)."""
    fmt = resolve_format(format, label_map, probability=probability)
    if fmt.per_product:
        raise ValueError(f"the {fmt.name} format has one row per product, not image")
    if fmt.name == "shopee":
        return write_shopee_submission(
            path, ids, predictions, label_map, expected=expected
        )
    return write_named_submission(
        path, ids, predictions, label_map, probability=probability, expected=expected
    )


def write_cdiscount_submission(
    path, product_ids: Sequence, predictions, label_map: Mapping, *, expected=None
) -> pd.DataFrame:
    """Validates and atomically writes ``_id,category_id`` (one row per product;
    ``path=None`` validates only)."""
    df = cdiscount_frame(product_ids, predictions, label_map)
    validate_cdiscount_submission(df, expected, label_map)
    _write(path, df)
    return df
