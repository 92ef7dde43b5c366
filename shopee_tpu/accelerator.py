"""``connect()``: find the hardware, set up distribution, return an ``Accelerator``.

This module, ``shopee_tpu.hardware`` (each backend's setup) and
``shopee_tpu.multihost`` (what several processes share) are the only code that
knows about TPUs, ``tf.distribute`` and ``keras.distribution``; everything else uses
an ``Accelerator``'s ``scope()``, ``replicas``, ``batch_size()`` and ``sync()``.

============  ================================================  ======================
Situation     TensorFlow backend                                JAX backend
============  ================================================  ======================
TPU           TPUClusterResolver(tpu="local") on a TPU VM, or   DataParallel over
              TPU_NAME; connect, initialize, TPUStrategy        all jax.devices()
Several GPUs  MirroredStrategy                                  DataParallel
Several       TF_CONFIG: MultiWorkerMirroredStrategy            keras.distribution
hosts                                                           .initialize(), then
                                                                DataParallel over
                                                                every host's devices
Otherwise     default strategy                                  default
============  ================================================  ======================

Kaggle's TPU v5e-8 image ships ``tensorflow-cpu``, so TensorFlow sees no TPU there
while JAX does. When Keras has not been imported yet (note: ``import tensorflow``
imports it), ``KERAS_BACKEND`` is unset and the machine is a TPU VM, ``connect()``
picks the JAX backend by itself. On a TPU VM whose backend cannot use the TPU
(Keras imported too early, or a JAX without TPU support), auto mode refuses with
one line naming the cause instead of training on the CPU for hours;
``device="cpu"`` (or ``JAX_PLATFORMS=cpu``) asks for the CPU on purpose.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from shopee_tpu import frameworks, multihost
from shopee_tpu.hardware import jax_setup, tensorflow_setup
from shopee_tpu.hardware.tpu_vm import AcceleratorNotFound, installed, tpu_vm_hints
from shopee_tpu.utils import require_tensorflow

__all__ = ["Accelerator", "AcceleratorNotFound", "connect", "connect_for"]

DEVICE_ENV = "SHOPEE_TPU_DEVICE"
DEVICES = ("auto", "tpu", "gpu", "cpu")
_STRATEGIES = (None, "mirrored", "default")
_POLICIES = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}


@dataclass
class Accelerator:
    """What ``connect()`` found and set up.

    Attributes:
        kind: ``"tpu"``, ``"gpu"`` or ``"cpu"``.
        replicas: Model replicas that share a global batch (over all workers).
        backend: The Keras backend, ``"tensorflow"`` or ``"jax"``.
        strategy: The ``tf.distribute.Strategy`` (TensorFlow backend only).
        distribution: ``keras.distribution.DataParallel`` (JAX, several devices).
        num_workers: Hosts or worker processes that feed input (multi-worker runs).
        worker_index: This process's index among them (0 is the chief).
        precision: The Keras dtype policy in force.
        note: Why the setup differs from what was asked (auto-mode fallbacks).
        devices: Names of this host's devices in use.
        local_replicas: Replicas on this host (``replicas`` over all hosts).
        max_steps_per_execution: The most training steps one compiled call may
            run here (``None``: no limit).
    """

    kind: str
    replicas: int
    backend: str
    strategy: Any = None
    distribution: Any = None
    num_workers: int = 1
    worker_index: int = 0
    precision: str = "float32"
    note: str = ""
    devices: list[str] = field(default_factory=list)
    local_replicas: int = 1
    max_steps_per_execution: int | None = None

    def scope(self):
        """Context manager in which models, optimizers and metrics are created."""
        if self.strategy is not None:
            return self.strategy.scope()
        return contextlib.nullcontext()

    def batch_size(self, per_replica: int) -> int:
        """The global batch size for ``per_replica`` examples on each replica."""
        return int(per_replica) * self.replicas

    def host_batch_size(self, per_replica: int) -> int:
        """The batch this host's input pipeline yields for ``load_dataset``.

        JAX assembles a global batch from every host's rows (each host feeds its
        own devices); ``tf.distribute`` takes the global batch on each worker and
        splits it itself.
        """
        if self.backend == "jax":
            return int(per_replica) * self.local_replicas
        return self.batch_size(per_replica)

    @property
    def chief(self) -> bool:
        """Whether this process writes shared outputs (process 0)."""
        return self.worker_index == 0

    def sync(self, name: str) -> None:
        """Waits until every process reaches the same ``sync(name)``."""
        if self.num_workers > 1:
            multihost.barrier(self, name)

    def from_chief(self, value: float) -> float:
        """The chief's ``value`` on every process (decisions all must share, such
        as stopping at a time limit, measured by each process's own clock)."""
        if self.num_workers == 1:
            return value
        return multihost.broadcast_from_chief(self, value)

    def set_precision(self, mixed_precision: bool | str) -> None:
        """Sets the Keras dtype policy as ``connect(mixed_precision=...)`` does,
        for a setting known only after connecting (a saved run's)."""
        _set_precision(self, mixed_precision)

    @property
    def summary(self) -> str:
        """One line: what runs where, and why if auto mode fell back."""
        how = "default strategy"
        if self.distribution is not None:
            how = type(self.distribution).__name__
        elif self.strategy is not None and (self.replicas > 1 or self.kind == "tpu"):
            how = type(self.strategy).__name__
        line = (
            f"shopee_tpu: {self.kind.upper()} x{self.replicas} replica(s), "
            f"backend={self.backend}, {how}, precision={self.precision}"
        )
        if self.num_workers > 1:
            line += (
                f", hosts={self.num_workers}, "
                f"worker {self.worker_index + 1}/{self.num_workers}"
            )
        if self.note:
            line += f" ({self.note})"
        return line

    def __str__(self) -> str:
        return self.summary


def connect(
    device: str | None = None,
    *,
    strategy: str | None = None,
    mixed_precision: bool | str = False,
    backend: str | None = None,
    verbose: bool = True,
) -> Accelerator:
    """Detects the hardware and sets up distribution for it.

    Args:
        device: ``"tpu"``, ``"gpu"`` or ``"cpu"`` force a device; ``None`` or
            ``"auto"`` take the ``SHOPEE_TPU_DEVICE`` environment variable when it
            is set, else detect. A forced device that is absent raises
            ``AcceleratorNotFound``; auto mode falls back to the CPU and says so in
            the summary line, except on a TPU VM (see the module docstring).
        strategy: ``None`` picks by the module docstring's table; ``"mirrored"``
            forces a ``MirroredStrategy`` over all local devices of the chosen kind
            (e.g. logical CPUs); ``"default"`` forces no distribution.
        mixed_precision: ``True``: ``mixed_bfloat16`` on TPU, ``mixed_float16`` on
            GPU, float32 on CPU. A policy name is applied on any device.
        backend: ``"tensorflow"`` or ``"jax"``. Only honoured before Keras is first
            imported; afterwards it must match the backend in use.
        verbose: Print the one-line summary.

    Returns:
        The ``Accelerator``.

    Raises:
        AcceleratorNotFound: A forced device is not present, or a TPU VM's TPU
            is out of the backend's reach in auto mode.
        ImportError: The TensorFlow backend is needed but TensorFlow is missing.
        ValueError: Unknown ``device`` or ``strategy``, or a backend mismatch.

    Example::

        acc = shopee_tpu.connect()   # prints e.g. "shopee_tpu: TPU x8 replica(s), ..."
        with acc.scope():
            model = build_model(...)
        ds = load_dataset(..., batch_size=acc.batch_size(64))
    """
    if device is None or device.strip().lower() == "auto":
        device = os.environ.get(DEVICE_ENV) or "auto"
    device = device.strip().lower()
    if device not in DEVICES:
        raise ValueError(
            f"device must be one of {DEVICES} (argument or ${DEVICE_ENV}), "
            f"got {device!r}"
        )
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")

    early = frameworks.first_import()  # what fixed Keras's backend, if anything
    if _choose_backend(backend, device) == "jax":
        acc = Accelerator(**jax_setup.setup(device, strategy))
    else:
        acc = Accelerator(**tensorflow_setup.setup(device, strategy, early))
    _set_precision(acc, mixed_precision)
    if verbose:
        print(acc.summary)
    return acc


def connect_for(
    config, device: str | None = None, accelerator=None, verbose: int = 1
) -> Accelerator:
    """``accelerator`` when given, else ``connect()`` as a run ``config`` asks:
    its device (unless ``device`` overrides it) and its mixed precision."""
    return accelerator or connect(
        device or config.device,
        mixed_precision=config.mixed_precision,
        verbose=verbose > 0,
    )


def _choose_backend(requested: str | None, device: str) -> str:
    if "keras" in sys.modules:
        import keras

        active = keras.backend.backend()
        if requested and requested != active:
            raise ValueError(
                f"Keras is already running on the {active!r} backend; to use "
                f"{requested!r}, restart the kernel and set "
                f"os.environ['KERAS_BACKEND'] = {requested!r} before importing "
                "keras or tensorflow."
            )
        return active
    target = requested or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if (
        not requested
        and not os.environ.get("KERAS_BACKEND")
        and device in ("auto", "tpu")
        and tpu_vm_hints()
        and importlib.util.find_spec("jax") is not None
        # With tensorflow-tpu installed TF owns the TPU (JAX cannot share it).
        and not installed("tensorflow-tpu")
    ):
        target = "jax"
    if target == "tensorflow":
        require_tensorflow()  # a clear install hint instead of keras' ImportError
    os.environ["KERAS_BACKEND"] = target
    import keras

    return keras.backend.backend()


# ---------------------------------------------------------------------------
# Precision


def _set_precision(acc: Accelerator, mixed_precision: bool | str) -> None:
    import keras

    if isinstance(mixed_precision, str):
        policy = mixed_precision
    elif mixed_precision:
        policy = _POLICIES.get(acc.kind, "float32")
        if policy == "float32":
            note = "mixed precision stays off on CPU (float32)"
            acc.note = f"{acc.note}; {note}" if acc.note else note
    else:
        policy = "float32"
    keras.mixed_precision.set_global_policy(policy)
    acc.precision = keras.mixed_precision.global_policy().name
