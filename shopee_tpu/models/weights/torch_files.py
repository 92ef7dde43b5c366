"""PyTorch and safetensors weight files read into numpy arrays, without torch.

``read_state_dict(path)`` returns ``{name: np.ndarray}`` for:

- PyTorch's zip serialization (``torch.save`` since 1.6): ``<archive>/data.pkl``
  plus one raw file per storage;
- PyTorch's legacy serialization (before 1.6, and what many 2019-2020 Kaggle
  datasets hold): three small pickles, the object's pickle, the storage keys, then
  each storage as an int64 element count and its bytes;
- safetensors, through the ``safetensors`` package's numpy API.

A tensor is a view of its storage with an offset, a shape and strides; the strides
are honoured, so a tensor stored in another memory order (some ported files keep
TensorFlow's) comes out right. Unpickling is restricted to the few classes a state
dict holds (tensors, storages, ordered dicts): a file cannot run code. A checkpoint
that wraps the state dict (``{"state_dict": ...}``, ``{"model": ...}``) is
unwrapped.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from shopee_tpu.models.weights.errors import WeightsError
from shopee_tpu.utils import require_extra

__all__ = ["TORCH_SUFFIXES", "is_torch_file", "read_state_dict"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch (zip or legacy) or safetensors file, by name.

    Raises:
        WeightsError: not such a file, an unsupported object inside it, or a
            tensor that reaches past its storage; the message names the file.
    """
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        if zipfile.is_zipfile(path):
            tree = _read_zip(path)
        else:
            with open(path, "rb") as f:
                tree = _read_legacy(f, path)
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError) as e:
        raise WeightsError(f"{path}: not a PyTorch weights file ({e})") from None
    return _tensors(_unwrap(tree), path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    require_extra("safetensors", "safetensors", f"{path}: reading .safetensors")
    from safetensors.numpy import load_file  # the optional [safetensors] extra

    try:
        return dict(load_file(path))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None


@dataclass
class _Storage:
    """One storage: its key in the file, dtype, element count, and (once read)
    its elements."""

    key: str
    dtype: object
    numel: int
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    """A tensor as the pickle describes it, materialised once storages are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self, name: str, path: str) -> np.ndarray:
        data = self.storage.data
        if any(s < 0 for s in self.stride) or self.offset < 0:
            raise WeightsError(f"{path}: tensor {name!r} has negative strides")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if data is None or (min(self.shape, default=1) > 0 and last >= data.size):
            raise WeightsError(f"{path}: tensor {name!r} reaches past its storage")
        if min(self.shape, default=1) == 0:
            return np.zeros(self.shape, data.dtype)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=[s * data.itemsize for s in self.stride],
            writeable=False,
        )
        return np.array(view, order="C")  # a copy in the usual memory order


def _rebuild_tensor(storage, offset, shape, stride, *_):
    return _Tensor(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves only what a state dict holds; storages come back as ``_Storage``."""

    classes = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    }

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) in self.classes:
            return self.classes[module, name]
        if module == "torch" and name in _DTYPES:
            return name  # a storage type: persistent_load reads its dtype
        raise pickle.UnpicklingError(f"unsupported object {module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.60}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if storage_type not in _DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, _DTYPES[storage_type], numel)
        return self.storages[key]


def _read_legacy(f, path: str):
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
        raise ValueError("no PyTorch magic number")
    pickle.load(f)  # protocol version
    info = pickle.load(f)
    if isinstance(info, dict) and not info.get("little_endian", True):
        raise WeightsError(f"{path}: big-endian PyTorch files are not supported")
    storages: dict[str, _Storage] = {}
    tree = _Unpickler(f, storages).load()
    for key in pickle.load(f):
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        storage.data = _elements(f.read(numel * _itemsize(storage.dtype)), storage)
    return tree


def _read_zip(path: str):
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError("a zip file without one <archive>/data.pkl")
        root = pickles[0][: -len("data.pkl")]
        names = set(z.namelist())
        order = f"{root}byteorder"
        if order in names and z.read(order).strip() != b"little":
            raise WeightsError(f"{path}: big-endian PyTorch files are not supported")
        storages: dict[str, _Storage] = {}
        tree = _Unpickler(io.BytesIO(z.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            name = f"{root}data/{key}"
            if name not in names:
                raise ValueError(f"storage {key} is missing from the archive")
            storage.data = _elements(z.read(name), storage)
    return tree


def _itemsize(dtype) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _elements(raw: bytes, storage: _Storage) -> np.ndarray:
    if len(raw) < storage.numel * _itemsize(storage.dtype):
        raise ValueError(f"storage {storage.key} is truncated")
    if storage.dtype == "bfloat16":  # numpy has none: the high half of a float32
        bits = np.frombuffer(raw, "<u2", storage.numel).astype(np.uint32) << 16
        return bits.view(np.float32)
    dtype = np.dtype(storage.dtype).newbyteorder("<")
    return np.frombuffer(raw, dtype, storage.numel).astype(dtype.newbyteorder("="))


def _unwrap(tree):
    """The state dict inside a training checkpoint's dict, if it is wrapped."""
    while isinstance(tree, dict) and not any(
        isinstance(v, _Tensor) for v in tree.values()
    ):
        inner = [tree[k] for k in _WRAPPERS if isinstance(tree.get(k), dict)]
        if not inner:
            break
        tree = inner[0]
    return tree


def _tensors(tree, path: str) -> dict[str, np.ndarray]:
    if not isinstance(tree, dict):
        raise WeightsError(
            f"{path}: holds a {type(tree).__name__}, not a state dict of tensors"
        )
    out = {}
    for name, value in tree.items():
        if isinstance(value, _Tensor):
            out[str(name).removeprefix("module.")] = value.array(str(name), path)
    if not out:
        raise WeightsError(f"{path}: holds no tensors")
    return out


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a PyTorch or safetensors file by its suffix."""
    return os.fspath(path).lower().endswith(TORCH_SUFFIXES)
