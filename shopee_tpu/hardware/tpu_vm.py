"""Whether this host is a TPU VM, and the one-line refusal when its TPU is out of
the active backend's reach, read without importing a framework."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

__all__ = ["AcceleratorNotFound", "installed", "out_of_reach", "tpu_vm_hints"]


class AcceleratorNotFound(RuntimeError):
    """A forced device (``connect(device="tpu")``) is not there, or a TPU VM's TPU
    is out of the active backend's reach."""


def tpu_vm_hints() -> list[str]:
    """Signs of a TPU VM (the TPU is attached to this host), without importing a
    framework: Kaggle sets ISTPUVM and TPU_PROCESS_ADDRESSES, Cloud TPU VMs
    TPU_ACCELERATOR_TYPE; TPU chips show up as /dev/accel* (v2-v4) or
    /dev/vfio/N (v5e and later) when libtpu is installed to drive them."""
    markers = ("ISTPUVM", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE")
    hints = [f"{k}={os.environ[k]}" for k in markers if os.environ.get(k)]
    if importlib.util.find_spec("libtpu") is not None and (
        glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    ):
        hints.append("TPU device files")
    return hints


def installed(distribution: str) -> bool:
    try:
        return bool(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return False


def out_of_reach(
    backend: str, problem: str, early: str | None = None
) -> AcceleratorNotFound:
    """The one-line refusal of auto mode on a TPU VM whose TPU the backend cannot
    use: what says it is a TPU VM, why the backend cannot, what chose it, and the
    ways out."""
    hints = ", ".join(tpu_vm_hints())
    if backend == "tensorflow":
        chose = (
            f"{early} before connect() could choose JAX"
            if early
            else f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')} chose it"
        )
        why = (
            f"Keras runs on TensorFlow, which cannot use the TPU ({problem}; "
            f"Kaggle's TPU image ships tensorflow-cpu): {chose}. Restart the "
            "kernel and call shopee_tpu.connect() (or set "
            "os.environ['KERAS_BACKEND'] = 'jax') before anything imports keras "
            "or tensorflow"
        )
    else:
        why = (
            f"JAX sees no TPU ({problem}): is jax[tpu] installed, or another "
            "process holding the TPU?"
        )
    return AcceleratorNotFound(
        f"connect(): this is a TPU VM ({hints}) but {why}; to train on the CPU "
        "on purpose, pass device='cpu' (--device cpu)"
    )
