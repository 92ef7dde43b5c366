"""The idx format of MNIST and Fashion-MNIST: reading (gzipped or not) and writing.

An idx file is a big-endian header, ``0 0 <type> <ndim>`` then ``ndim`` uint32
sizes, followed by the values in C order. ``train-images-idx3-ubyte`` holds
``60000 x 28 x 28`` uint8 pixels, ``train-labels-idx1-ubyte`` 60000 uint8 class
ids. Gzip is recognised by its magic bytes, not by the file name, so a file that
was unpacked but kept its ``.gz`` suffix (or the reverse) still reads. A file that
is cut short or is not idx at all raises :class:`IdxFormatError` with one line
naming the file and what is wrong.

Only numpy is needed: the benchmarks and the record writer read these files
without TensorFlow.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from shopee_tpu import fs

__all__ = ["IdxFormatError", "read_idx", "read_idx_pair", "write_idx"]

# Type byte -> big-endian numpy dtype (the idx specification's six types).
_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """An idx file that is truncated, too long or not idx; the message names it."""


def _raw(path: str) -> bytes:
    """The file's bytes, gunzipped when they are gzip data."""
    if not fs.exists(path):
        raise FileNotFoundError(f"idx file not found: {path}")
    with fs.local_copy(path) as local, open(local, "rb") as f:
        data = f.read()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise IdxFormatError(
            f"{path}: truncated or corrupt gzip data ({type(e).__name__}: {e}); "
            "download the file again"
        ) from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file (``*-idx3-ubyte``, ``*-idx1-ubyte``, gzipped or not).

    Args:
        path: Local or gs:// path.

    Returns:
        The array with the header's shape, in native byte order: ``uint8``
        ``[N, rows, cols]`` for image files, ``uint8 [N]`` for label files.

    Raises:
        FileNotFoundError: No such file.
        IdxFormatError: Not idx data, or fewer or more bytes than the header
            announces (the message gives both counts).
    """
    path = os.fspath(path)
    data = _raw(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise IdxFormatError(
            f"{path}: not an idx file (first bytes {data[:4].hex(' ') or 'none'}; "
            "idx starts with 00 00, a type byte 08..0e and the number of dimensions)"
        )
    dtype, ndim = _TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(
            f"{path}: truncated idx header ({len(data)} of {header} bytes)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        dims = " x ".join(map(str, shape))
        kind = "truncated" if found < expected else "too long"
        raise IdxFormatError(
            f"{path}: {kind} idx file: the header announces {dims} {dtype.name} "
            f"values ({expected} bytes), the file holds {found} bytes after it"
        )
    values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx_pair(
    images: str | os.PathLike, labels: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an images file and its labels file and checks that they match.

    Returns:
        ``(images [N, rows, cols] uint8, labels [N])``.

    Raises:
        IdxFormatError: Either file is malformed, the images are not ``N x rows x
            cols`` (or ``x channels``), the labels not one value per image, or the
            counts differ.
    """
    x, y = read_idx(images), read_idx(labels)
    if x.ndim not in (3, 4):
        raise IdxFormatError(
            f"{os.fspath(images)}: holds a {x.ndim}-dimensional array {x.shape}; "
            "images are N x rows x columns (idx3)"
        )
    if y.ndim != 1:
        raise IdxFormatError(
            f"{os.fspath(labels)}: holds a {y.ndim}-dimensional array {y.shape}; "
            "labels are one value per image (idx1)"
        )
    if len(x) != len(y):
        raise IdxFormatError(
            f"{os.fspath(images)} holds {len(x)} images but {os.fspath(labels)} "
            f"{len(y)} labels"
        )
    return x, y


def write_idx(path: str | os.PathLike, array) -> None:
    """Writes ``array`` as an idx file, gzipped when ``path`` ends in ``.gz``.

    The dtype must be one idx has (uint8, int8, int16, int32, float32, float64).
    The file is written atomically.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"idx has no type for {array.dtype}; use one of uint8, ...")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(_TYPES[code], copy=False).tobytes()
    path = os.fspath(path)
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    fs.write_bytes(path, data)
