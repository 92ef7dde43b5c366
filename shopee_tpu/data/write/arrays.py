"""Images held as arrays -> records: ``write_arrays`` (``keras.datasets`` output as
it comes) and ``write_idx_records`` (MNIST's idx files).

Pixels go to the one record writer (``records.write_rows``) as they are: each image
is encoded losslessly as PNG in a writer process and stored as PNG when at most 64
pixels a side, so a 28 x 28 image reads back pixel for pixel
(``shopee_tpu.data.write.images``). Grey arrays (``N x H x W`` or
``N x H x W x 1``) stay one channel in the records; the manifest's ``channels``
says which.

Labels may be class ids (integers) or class names (text). Integer class ids are
kept as they are: without ``class_names``, class ``k`` is named ``"k"`` and the
classes are ``0 .. max(labels)``, so a class no image has still keeps its id.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shopee_tpu.data.write import sources
from shopee_tpu.data.write.idx import read_idx, read_idx_pair
from shopee_tpu.data.write.records import write_rows
from shopee_tpu.data.write.shard_writer import Pixels, Unusable

__all__ = [
    "write_arrays",
    "write_idx_records",
    "write_pixels",
    "check_images",
    "class_ids_of",
    "read_class_names",
]


def write_arrays(
    images,
    labels,
    out_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    ids: Sequence | None = None,
    groups: Sequence | None = None,
    label_map: Mapping | str | os.PathLike | None = None,
    **options,
) -> dict:
    """Writes images held in memory as records plus ``manifest.json``.

    ``write_arrays(x_train, y_train, "recs/train", class_names)`` with what
    ``keras.datasets.fashion_mnist.load_data()`` returns; ``write_arrays(x_test,
    None, "recs/test")`` for a test set without labels.

    Args:
        images: uint8 pixels ``N x H x W`` (grey), ``N x H x W x 1`` or ``N x H x W
            x 3`` (RGB); a numpy array or anything ``np.asarray`` takes. Other
            integer types are accepted when every value is in 0..255.
        labels: ``N`` class ids (integers; ``N x 1`` as ``keras.datasets`` gives
            them is fine) or class names (text); ``None`` for unlabeled (test)
            records.
        out_dir: Local folder for the shards and the manifest.
        class_names: The name of each class id, in id order (e.g. Fashion-MNIST's
            ``"T-shirt/top", "Trouser", ...``); they become the label map and the
            names a submission writes.
        ids: One id per image (default: its index ``"0"``, ``"1"``, ...); a
            submission names each image by it.
        groups: One group per image (e.g. a product id): a group stays in one
            shard, so held-out shards split by group.
        label_map: A ``{class name: class id}`` mapping, JSON file or training
            records' manifest to reuse instead of ``class_names`` (e.g. for a
            validation set).
        **options: ``shards``, ``image_size``, ``resize``, ``quality``,
            ``workers``, ``overwrite``, ``seed``, ``prefix``, ``verbose``: as in
            :func:`shopee_tpu.data.write.records.write_records`. Square images keep
            their side unless ``image_size`` is given.

    Returns:
        The manifest (see :func:`shopee_tpu.data.read_manifest`).

    Raises:
        ValueError: One line naming the problem: a shape or dtype that is not
            pixels, labels, ids or groups of another length than the images, a
            label outside ``class_names`` or ``label_map``.
    """
    return write_pixels(
        check_images(images),
        labels,
        out_dir,
        class_names=class_names,
        ids=ids,
        groups=groups,
        label_map=label_map,
        **options,
    )


def write_idx_records(
    images: str | os.PathLike,
    labels: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    **options,
) -> dict:
    """Writes records from MNIST-style idx files (gzipped or not).

    ``labels`` may be ``None`` for images without labels. Class names come from
    ``class_names``, else they are the class ids. The other arguments are those of
    :func:`write_arrays`.

    Raises:
        IdxFormatError: A truncated or malformed file, or counts that differ (one
            line naming the file).
    """
    if labels is None:
        x, y = read_idx(images), None
    else:
        x, y = read_idx_pair(images, labels)
    name = os.path.basename(os.fspath(images))
    return write_pixels(
        check_images(x, where=os.fspath(images)),
        y,
        out_dir,
        class_names=class_names,
        where=os.fspath(labels if labels is not None else images),
        row=lambda i: f"{name}[{i}]",
        **options,
    )


def check_images(images, *, where: str = "images") -> np.ndarray:
    """``images`` as a uint8 ``N x H x W`` or ``N x H x W x C`` (C = 1 or 3) array.

    Raises:
        ValueError: Another shape, no images, floats, or values outside 0..255.
    """
    try:
        array = np.asarray(images)
    except ValueError as e:  # ragged nested lists
        raise ValueError(
            f"{where}: not one array ({e}); pass one N x H x W[ x C] array"
        ) from None
    shape = " x ".join(map(str, array.shape))
    if array.dtype == object or array.ndim not in (3, 4) or len(array) == 0:
        raise ValueError(
            f"{where}: expected N x H x W or N x H x W x C pixels (C = 1 or 3), got "
            f"shape ({shape}) of {array.dtype}"
        )
    if array.ndim == 4 and array.shape[3] not in (1, 3):
        raise ValueError(
            f"{where}: {array.shape[3]} channels in shape ({shape}); images have 1 "
            "(grey) or 3 (RGB), channels last"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: pixels must be uint8 0..255, got {array.dtype} (scaled to "
            "0..1? pass (images * 255).round().astype('uint8'))"
        )
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > 255:
        raise ValueError(
            f"{where}: pixels must be 0..255, found values {lo}..{hi} ({array.dtype})"
        )
    return array.astype(np.uint8)


def class_ids_of(
    labels,
    n: int,
    *,
    class_names: Sequence[str] | None = None,
    label_map: Mapping | str | os.PathLike | None = None,
    where: str = "labels",
    row: Callable[[int], str] = "row {}".format,
    unusable: Mapping[int, str] | None = None,
) -> tuple[dict[str, int], np.ndarray | None]:
    """The label map and the class id of each of ``n`` images.

    Integer labels are class ids (named by ``class_names``, by ``label_map`` or
    as ``"0"``, ``"1"``, ...); text labels are class names (numbered by
    ``class_names`` or ``label_map``, else in sorted order). ``labels=None``
    gives ids ``None`` (unlabeled). Rows in ``unusable`` are not checked.
    Messages name the source ``where`` and a row by ``row(index)``.

    Raises:
        ValueError: Another length than ``n``, a negative or unnamed class id, a
            name outside the label map, or both ``class_names`` and ``label_map``.
    """
    if class_names is not None and label_map is not None:
        raise ValueError("give class_names or label_map, not both")
    known = sources.load_label_map(label_map)
    if class_names is not None:
        known = _names_map(class_names)
    if labels is None:
        return known or {}, None
    values = np.asarray(labels)
    if values.ndim == 2 and values.shape[1] == 1:  # keras.datasets' N x 1
        values = values[:, 0]
    if values.ndim != 1 or len(values) != n:
        raise ValueError(
            f"{where}: {' x '.join(map(str, values.shape))} labels for {n} images; "
            "give one label per image"
        )
    skip = np.zeros(n, bool)
    skip[list(unusable or ())] = True
    if values.dtype.kind == "f" and np.all(np.mod(values[~skip], 1) == 0):
        values = values.astype(np.int64)  # whole-number floats (pandas, NaN-free)
    if values.dtype.kind in "iu":
        return _from_ids(values.astype(np.int64), skip, known, where, row)
    text = np.array([str(v) for v in values.tolist()], dtype=object)
    if known is None:
        known = sources.build_label_map(text[~skip])
    sources.check_labels(text[~skip], known, where)
    ids = np.array([known.get(t, -1) for t in text], np.int64)
    return known, ids


def _names_map(class_names: Sequence[str]) -> dict[str, int]:
    names = [str(c) for c in class_names]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(f"class_names: {', '.join(map(repr, repeated))} repeated")
    return {name: i for i, name in enumerate(names)}


def _from_ids(ids: np.ndarray, skip: np.ndarray, known, where: str, row):
    """Integer labels: checked against the label map, or one made from them."""
    used = ids[~skip]
    if known is None:
        bad = np.flatnonzero(~skip & (ids < 0))
        if len(bad):
            raise ValueError(
                f"{where}: class id {ids[bad[0]]} at {row(bad[0])} is negative"
            )
        known = {str(i): i for i in range(int(used.max()) + 1 if len(used) else 0)}
    valid = set(known.values())
    bad = [int(i) for i in np.flatnonzero(~skip) if int(ids[i]) not in valid]
    if bad:
        raise ValueError(
            f"{where}: class id {ids[bad[0]]} at {row(bad[0])} has no class name "
            f"({len(bad)} rows; the label map has ids {min(valid, default=0)}.."
            f"{max(valid, default=-1)})"
        )
    return known, ids


def read_class_names(text: str | os.PathLike | None) -> list[str] | None:
    """Class names from a file (one per line) or a comma-separated string."""
    if text is None:
        return None
    text = os.fspath(text)
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [name.strip() for name in text.split(",")]


def _texts(values, n: int, what: str) -> list[str]:
    values = [str(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} images")
    return values


def write_pixels(
    images: np.ndarray,
    labels,
    out_dir,
    *,
    class_names=None,
    ids=None,
    groups=None,
    label_map=None,
    where: str = "labels",
    row: Callable[[int], str] = "images[{}]".format,
    unusable: Mapping[int, str] | None = None,
    **options,
) -> dict:
    """Writes checked uint8 ``images`` (see :func:`check_images`) with their
    labels, ids and groups (see :func:`write_arrays`): the step every array-like
    source shares. Rows in ``unusable`` (index -> reason) are recorded as skipped;
    ``where`` and ``row(index)`` name the source and a row in messages."""
    n = len(images)
    unusable = dict(unusable or {})
    label_map, class_ids = class_ids_of(
        labels,
        n,
        class_names=class_names,
        label_map=label_map,
        where=where,
        row=row,
        unusable=unusable,
    )
    ids = _texts(ids, n, "ids") if ids is not None else [str(i) for i in range(n)]
    if len(set(ids)) != n:
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"ids: {twice!r} is the id of more than one image")
    groups = _texts(groups, n, "groups") if groups is not None else [""] * n
    test = class_ids is None
    if test:
        class_ids = np.full(n, -1, np.int64)
    rows = [
        (
            Unusable(row(i), unusable[i]) if i in unusable else Pixels(images[i]),
            int(class_ids[i]),
            ids[i],
            groups[i],
        )
        for i in range(n)
    ]
    digest = hashlib.md5(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    digest.update(repr(sorted(unusable.items())).encode())
    if options.get("image_size") is None and images.shape[1] == images.shape[2]:
        # Every image is a square of this side: the manifest says so, and readers
        # at that size decode without a resize step.
        options["image_size"] = int(images.shape[1])
    return write_rows(
        rows,
        out_dir,
        label_map=label_map,
        test=test,
        content=digest.hexdigest(),
        **options,
    )
