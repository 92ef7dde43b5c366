"""The TFRecord file format and ``tf.train.Example`` encoding, without TensorFlow.

The writer's worker processes use this so that they start in a fraction of a second:
importing TensorFlow costs about 5 s per process on a small machine, which would eat
the gain of writing shards in parallel. Files written here are read by
``tf.data.TFRecordDataset``, which checks both CRCs of every record.

A record is ``uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`` (little-endian). The CRC is CRC-32C (Castagnoli);
Python's ``zlib.crc32`` uses another polynomial, so CRC-32C is computed here with
numpy tables in blocks (about 0.15 ms for a 30 KB record).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["crc32c", "encode_example", "RecordWriter"]

_POLY = 0x82F63B78  # CRC-32C, reflected
_BLOCK = 256  # bytes per vectorised block


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


_T = _byte_table()
_T_LIST = [int(v) for v in _T]


def _zeros(states: np.ndarray, n: int) -> np.ndarray:
    """Advances CRC registers over ``n`` zero bytes (vectorised over ``states``)."""
    for _ in range(n):
        states = _T[states & 0xFF] ^ (states >> 8)
    return states


# _POS[j, b]: contribution of byte value b at offset j of a block to the register at
# the end of the block (register starting at 0). The CRC is linear over GF(2), so a
# block's contribution is the XOR of these, and the incoming register's is _SHIFT.
_POS = np.empty((_BLOCK, 256), np.uint32)
_POS[_BLOCK - 1] = _T
for _j in range(_BLOCK - 2, -1, -1):
    _POS[_j] = _zeros(_POS[_j + 1], 1)
_POS_FLAT = _POS.ravel()
_OFFSETS = (np.arange(_BLOCK, dtype=np.intp) * 256)[:, None]  # row j of _POS_FLAT
_SHIFT = [
    [
        int(v)
        for v in _zeros(np.arange(256, dtype=np.uint32) << np.uint32(8 * k), _BLOCK)
    ]
    for k in range(4)
]
_SMALL = 512  # shorter data: a plain table loop is faster than numpy's set-up


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    if len(data) < _SMALL:
        crc = 0xFFFFFFFF
        table = _T_LIST
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    # Starting the register at 0xFFFFFFFF equals complementing the first four
    # bytes and starting at 0; from 0, leading zero bytes change nothing, so the
    # data is padded at the front to whole blocks and every byte goes through the
    # vectorised table lookup.
    pad = -len(data) % _BLOCK
    buf = np.zeros(pad + len(data), np.uint8)
    buf[pad:] = np.frombuffer(data, np.uint8)
    buf[pad : pad + 4] ^= 0xFF
    blocks = buf.reshape(-1, _BLOCK)
    parts = np.bitwise_xor.reduce(_POS_FLAT[blocks.T + _OFFSETS], axis=0).tolist()
    s0, s1, s2, s3 = _SHIFT
    crc = 0
    for part in parts:
        crc = (
            s0[crc & 0xFF]
            ^ s1[(crc >> 8) & 0xFF]
            ^ s2[(crc >> 16) & 0xFF]
            ^ s3[crc >> 24]
            ^ part
        )
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
    """Encodes one ``tf.train.Feature`` from bytes/str, int, float or a list of them."""
    values = value if isinstance(value, list | tuple | np.ndarray) else [value]
    first = values[0] if len(values) else b""
    if isinstance(first, bytes | str):
        items = b"".join(
            _field(1, v.encode("utf-8") if isinstance(v, str) else v) for v in values
        )
        return _field(1, items)  # bytes_list
    if isinstance(first, float | np.floating):
        packed = struct.pack(f"<{len(values)}f", *values)
        return _field(2, _field(1, packed))  # float_list
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed))  # int64_list


def encode_example(features: Mapping[str, object]) -> bytes:
    """Serialises a ``tf.train.Example`` from ``{name: value}``.

    Values: ``bytes``/``str`` (bytes_list), ``int`` (int64_list), ``float``
    (float_list), or a list of one of these.
    """
    entries = b"".join(
        _field(1, _field(1, name.encode("utf-8")) + _field(2, _feature(value)))
        for name, value in features.items()
    )
    return _field(1, entries)


class RecordWriter:
    """Appends records to a TFRecord file (uncompressed), like tf.io.TFRecordWriter."""

    def __init__(self, path: str):
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())

    def write(self, record: bytes) -> None:
        """Appends one serialised record."""
        header = struct.pack("<Q", len(record))
        self._file.write(header)
        self._file.write(struct.pack("<I", _masked(crc32c(header))))
        self._file.write(record)
        self._file.write(struct.pack("<I", _masked(crc32c(record))))

    def close(self) -> None:
        """Flushes and closes the file (fsync so a rename after it is durable)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str) -> Sequence[bytes]:
    """Reads every record of an uncompressed TFRecord file, checking CRCs.

    A small pure-Python reader for tests and tools that run without TensorFlow.
    """
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc_len,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if crc_len != _masked(crc32c(header)):
            raise ValueError(f"{path}: corrupt record length at byte {pos}")
        record = data[pos + 12 : pos + 12 + length]
        (crc_data,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if len(record) != length or crc_data != _masked(crc32c(record)):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        out.append(record)
        pos += 16 + length
    return out
