"""Reading Cdiscount's BSON files one product at a time, in constant memory.

``train.bson`` (58 GB) and ``test.bson`` (14.5 GB) are concatenations of BSON
documents ``{_id, category_id, imgs: [{picture: <JPEG bytes>}, ...]}`` (test
documents have no ``category_id``). Each document starts with its total length as a
little-endian int32, so a file can be walked without parsing it: read 4 bytes, read
the rest of the document, decode it with pymongo's ``bson`` module (the one
``bson.decode_file_iter`` uses; never the PyPI package named ``bson``, which replaces
pymongo's module and breaks it). Only one document is held at a time, and the byte
offset of every product comes for free, which makes the offset index behind
:func:`read_product`'s random access.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "BsonFormatError",
    "Product",
    "iter_products",
    "read_product",
    "require_bson",
]

_INT32 = struct.Struct("<i")
_MIN_DOC = 5  # int32 length + the terminating NUL of an empty document


class BsonFormatError(ValueError):
    """A BSON file that cannot be read on; the message names the byte offset."""


@dataclass(frozen=True)
class Product:
    """One decoded document.

    Attributes:
        offset, length: Where the document sits in the file (bytes).
        id: The ``_id`` (an integer product id).
        category_id: The ``category_id``, or ``None`` (test files).
        pictures: The JPEG bytes of each entry of ``imgs``, in order; ``b""`` for an
            entry without a picture. Empty when the document has no ``imgs``.
    """

    offset: int
    length: int
    id: int
    category_id: int | None
    pictures: tuple[bytes, ...]


def require_bson():
    """Imports pymongo's ``bson`` module, or says how to install it."""
    try:
        import bson
    except ImportError:
        raise ImportError(
            "reading Cdiscount BSON files needs pymongo: `pip install "
            "shopee_tpu[cdiscount]` (or `pip install pymongo`). Do not install the "
            "PyPI package named `bson`: it replaces pymongo's module."
        ) from None
    if not hasattr(bson, "decode_file_iter"):
        raise ImportError(
            f"the `bson` module at {getattr(bson, '__file__', '?')} is not pymongo's "
            "(the PyPI package named `bson` is installed?): `pip uninstall bson` and "
            "reinstall pymongo"
        )
    return bson


def _product(doc: dict, offset: int, length: int, where: str) -> Product:
    if "_id" not in doc:
        raise BsonFormatError(f"{where}: document at byte {offset} has no _id")
    pid = doc["_id"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise BsonFormatError(
            f"{where}: document at byte {offset} has _id={pid!r}; expected an "
            "integer product id"
        )
    category = doc.get("category_id")
    if category is not None and (
        isinstance(category, bool) or not isinstance(category, int)
    ):
        raise BsonFormatError(
            f"{where}: product {pid} (byte {offset}) has category_id={category!r}; "
            "expected an integer"
        )
    imgs = doc.get("imgs")
    pictures: list[bytes] = []
    if isinstance(imgs, list):
        for img in imgs:
            picture = img.get("picture") if isinstance(img, dict) else None
            pictures.append(bytes(picture) if picture else b"")
    return Product(offset, length, pid, category, tuple(pictures))


def _decode(bson, data: bytes, offset: int, n_read: int | None, where: str) -> dict:
    try:
        return bson.decode(data)
    except Exception as e:  # bson.errors.InvalidBSON and friends
        after = f" after {n_read} complete products" if n_read is not None else ""
        raise BsonFormatError(
            f"{where}: corrupt document at byte {offset}{after} "
            f"({type(e).__name__}: {e})"
        ) from None


def iter_products(
    path: str | os.PathLike, *, start: int = 0, stop: int | None = None
) -> Iterator[Product]:
    """Yields the products of a Cdiscount BSON file in file order.

    Args:
        path: ``train.bson``, ``test.bson`` or ``train_example.bson``.
        start: Byte offset of the first document to read (a document boundary).
        stop: Stop before the document at or after this offset (``None``: the end).

    Raises:
        BsonFormatError: The file is truncated or corrupt. The message names the
            byte offset and how many complete products were read before it.
    """
    bson = require_bson()
    path = os.fspath(path)
    size = os.path.getsize(path)
    n_read = 0
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(start)
        offset = start
        while stop is None or offset < stop:
            head = f.read(4)
            if not head:
                return
            remaining = size - offset
            if len(head) < 4:
                raise _truncated(path, offset, None, remaining, n_read)
            (length,) = _INT32.unpack(head)
            if length < _MIN_DOC:
                raise BsonFormatError(
                    f"{path}: corrupt document length {length} at byte {offset} "
                    f"after {n_read} complete products"
                )
            body = f.read(length - 4)
            if len(body) < length - 4:
                raise _truncated(path, offset, length, remaining, n_read)
            doc = _decode(bson, head + body, offset, n_read, path)
            yield _product(doc, offset, length, path)
            n_read += 1
            offset += length


def _truncated(path, offset, length, remaining, n_read) -> BsonFormatError:
    declared = f"declares {length} bytes" if length else "has no complete length"
    return BsonFormatError(
        f"{path}: truncated at byte {offset}: the document there {declared} but only "
        f"{remaining} bytes remain, after {n_read} complete products. The file is "
        "incomplete (an interrupted download or copy?)"
    )


def read_product(f, offset: int, length: int, *, where: str = "BSON file") -> Product:
    """Reads the one product at ``offset`` from an open binary file (random access).

    The offset and length come from the index that ``cdiscount prepare`` saves
    (``index.npz``) or from :class:`Product` itself.
    """
    bson = require_bson()
    f.seek(offset)
    data = f.read(length)
    if len(data) < length:
        raise BsonFormatError(
            f"{where}: truncated at byte {offset}: the product there needs "
            f"{length} bytes, only {len(data)} remain (the file changed since it "
            "was indexed?)"
        )
    (declared,) = _INT32.unpack(data[:4])
    if declared != length:
        raise BsonFormatError(
            f"{where}: no document of {length} bytes at byte {offset} (found a length "
            f"of {declared}); the file changed since it was indexed"
        )
    return _product(_decode(bson, data, offset, None, where), offset, length, where)
