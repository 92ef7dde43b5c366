"""Writes the PyTorch files tests/test_models_torch_files.py reads, with real torch.

Made with torch 2.13.0 (CPU) on Python 3.11, in a scratch venv (torch is no
dependency of shopee_tpu, nor of its tests):

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    /tmp/torch/bin/python tests/data/torch/make_files.py tests/data/torch

- ``tiny_zip.pth``: ``torch.save`` as it is (the zip serialization) of a small
  module's state dict: conv, batch norm (with its int64 ``num_batches_tracked``),
  linear;
- ``tiny_legacy.pth``: the same with ``_use_new_zipfile_serialization=False``
  (the pre-1.6 layout of many 2019-2020 Kaggle datasets);
- ``views_zip.pth`` / ``views_legacy.pth``: a checkpoint ``{"epoch",
  "state_dict"}`` whose tensors are views: a transposed (non-contiguous) one, a
  slice at an offset, two tensors sharing one storage; float16, bfloat16,
  float64, bool;
- ``expected.npz``: every tensor as torch itself reads it back (bfloat16 as its
  raw uint16 bits, which numpy lacks a type for), named ``<file>/<tensor>``.
"""

import collections
import os
import sys

import numpy as np
import torch


def tiny_state() -> collections.OrderedDict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    model.train()
    model(torch.randn(2, 3, 3, 3))  # running statistics move, the count is 1
    return model.state_dict()


def views() -> dict:
    torch.manual_seed(1)
    base = torch.randn(3, 5)
    shared = torch.arange(12, dtype=torch.float32)
    return {
        "epoch": 7,
        "state_dict": collections.OrderedDict(
            transposed=base.t(),  # strides (1, 5)
            offset_slice=base[1:, 2:],  # a view at storage offset 7
            shared_a=shared[:6].view(2, 3),
            shared_b=shared[6:],
            half=torch.randn(4).half(),
            bfloat=torch.randn(2, 2).bfloat16(),
            double=torch.randn(3, dtype=torch.float64),
            flags=torch.tensor([True, False, True]),
        ),
    }


def expected(name: str, state: dict) -> dict:
    out = {}
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            out[f"{name}/{key}"] = (
                tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
            )
        else:
            out[f"{name}/{key}"] = tensor.numpy().copy()
    return out


def main(folder: str) -> None:
    files = {
        "tiny_zip.pth": (tiny_state(), True),
        "tiny_legacy.pth": (tiny_state(), False),
        "views_zip.pth": (views(), True),
        "views_legacy.pth": (views(), False),
    }
    arrays = {}
    for name, (obj, zipped) in files.items():
        path = os.path.join(folder, name)
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        loaded = torch.load(path, weights_only=True)
        state = loaded["state_dict"] if "state_dict" in loaded else loaded
        arrays.update(expected(name, state))
    np.savez(os.path.join(folder, "expected.npz"), **arrays)
    print(f"torch {torch.__version__}: {sorted(files)} and expected.npz in {folder}")


if __name__ == "__main__":
    main(sys.argv[1])
