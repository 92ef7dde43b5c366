"""Writes PyTorch state dicts without torch, in both of PyTorch's serializations, for
the loader tests: what ``torch.save`` writes, rebuilt from its documented layout.

- legacy (``_use_new_zipfile_serialization=False``): pickles of the magic number,
  the protocol version and the system info, then the object's pickle (storages as
  persistent ids ``("storage", type, key, location, numel, view)``), then the list
  of storage keys, then each storage as an int64 element count and its bytes;
- zip: ``archive/data.pkl`` (persistent ids ``("storage", type, key, location,
  numel)``), ``archive/data/<key>`` raw bytes, ``archive/version``,
  ``archive/byteorder``.

``strided`` names tensors to store in the transposed memory order with permuted
strides, as some ported files do.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

_STORAGES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("int64"): "LongStorage",
}


def _rebuild_tensor_v2(*args):  # a stand-in: only its pickled name matters
    raise NotImplementedError


@contextlib.contextmanager
def _fake_torch():
    """``torch`` and ``torch._utils`` modules holding the names pickle refers to."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    _rebuild_tensor_v2.__module__ = "torch._utils"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in _STORAGES.values():
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _StorageRef:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape, stride):
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self):
        return (
            _rebuild_tensor_v2,
            (
                self.storage,
                0,
                self.shape,
                self.stride,
                False,
                collections.OrderedDict(),
            ),
        )


def _refs(tensors: dict, strided: tuple[str, ...]):
    """The pickled state dict and its storages, in key order."""
    state, storages = collections.OrderedDict(), []
    for i, (name, value) in enumerate(tensors.items()):
        value = np.asarray(value)
        if name in strided and value.ndim >= 2:
            # Stored in reversed axis order; the strides put the axes back.
            order = value.transpose(tuple(reversed(range(value.ndim))))
            data = np.ascontiguousarray(order).reshape(-1)
            stride, acc = [], 1
            for n in value.shape:
                stride.append(acc)
                acc *= n
        else:
            data = np.ascontiguousarray(value).reshape(-1)
            stride, acc = [], 1
            for n in reversed(value.shape):
                stride.insert(0, acc)
                acc *= n
        storage = _StorageRef(str(i), data)
        storages.append(storage)
        state[name] = _TensorRef(storage, tuple(value.shape), tuple(stride))
    return state, storages


def _pickler(f, torch, legacy: bool):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, _StorageRef):
                return None
            kind = getattr(torch, _STORAGES[obj.data.dtype])
            if legacy:
                return ("storage", kind, obj.key, "cpu", obj.data.size, None)
            return ("storage", kind, obj.key, "cpu", obj.data.size)

    return Pickler(f, protocol=2)


def save_legacy(path, tensors: dict, strided: tuple[str, ...] = ()) -> None:
    state, storages = _refs(tensors, strided)
    with _fake_torch() as torch, open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
        pickle.dump(info, f, protocol=2)
        _pickler(f, torch, legacy=True).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def save_zip(path, tensors: dict, strided: tuple[str, ...] = ()) -> None:
    state, storages = _refs(tensors, strided)
    buffer = io.BytesIO()
    with _fake_torch() as torch:
        _pickler(buffer, torch, legacy=False).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.data.tobytes())
        z.writestr("archive/version", "3\n")
