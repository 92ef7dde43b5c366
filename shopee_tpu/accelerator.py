"""``connect()``: find the hardware, set up distribution, return an ``Accelerator``.

This is the only module that knows about TPUs, ``tf.distribute`` strategies and
``keras.distribution``. Everything else receives an ``Accelerator`` and uses its
``scope()``, ``replicas`` and ``batch_size()``.

Which route is taken:

============  ==========================================  ============================
Situation     TensorFlow backend                          JAX backend
============  ==========================================  ============================
TPU           TPUClusterResolver(tpu="local") on a TPU    keras.distribution.DataParallel
              VM, or TPU_NAME; connect, initialize,       over all jax.devices()
              TPUStrategy
Several GPUs  MirroredStrategy                            DataParallel
TF_CONFIG     MultiWorkerMirroredStrategy                 --
Otherwise     default strategy                            default
============  ==========================================  ============================

Kaggle's TPU v5e-8 image ships ``tensorflow-cpu``, so TensorFlow sees no TPU there
while JAX does. When Keras has not been imported yet, ``KERAS_BACKEND`` is unset and
the machine looks like a TPU VM, ``connect()`` picks the JAX backend by itself.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Accelerator", "AcceleratorNotFound", "connect"]

DEVICE_ENV = "SHOPEE_TPU_DEVICE"
_DEVICES = ("auto", "tpu", "gpu", "cpu")
_POLICIES = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}


class AcceleratorNotFound(RuntimeError):
    """A forced device (``connect(device="tpu")``) is not there."""


@dataclass
class Accelerator:
    """What ``connect()`` found and set up.

    Attributes:
        kind: ``"tpu"``, ``"gpu"`` or ``"cpu"``.
        replicas: Number of model replicas that share a global batch.
        backend: The Keras backend, ``"tensorflow"`` or ``"jax"``.
        strategy: The ``tf.distribute.Strategy`` (TensorFlow backend only).
        distribution: The ``keras.distribution.Distribution`` (JAX backend, several
            devices only).
        num_workers: Hosts or worker processes that feed input (multi-worker runs).
        worker_index: This process's index among them.
        precision: The Keras dtype policy in force.
        note: Why the setup differs from what was asked (auto-mode fallbacks).
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

    def scope(self):
        """Context manager in which models, optimizers and metrics are created."""
        if self.strategy is not None:
            return self.strategy.scope()
        return contextlib.nullcontext()

    def batch_size(self, per_replica: int) -> int:
        """The global batch size for ``per_replica`` examples on each replica."""
        return int(per_replica) * self.replicas

    @property
    def summary(self) -> str:
        """One line: what runs where."""
        if self.distribution is not None:
            how = type(self.distribution).__name__
        elif self.strategy is not None and self.replicas > 1 or self.kind == "tpu":
            how = type(self.strategy).__name__
        else:
            how = "default strategy"
        line = (
            f"shopee_tpu: {self.kind.upper()} x{self.replicas} replica(s), "
            f"backend={self.backend}, {how}, precision={self.precision}"
        )
        if self.num_workers > 1:
            line += f", worker {self.worker_index + 1}/{self.num_workers}"
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
        device: ``"auto"`` (default), ``"tpu"``, ``"gpu"`` or ``"cpu"``. Falls back
            to the ``SHOPEE_TPU_DEVICE`` environment variable. A forced device that
            is absent raises ``AcceleratorNotFound``; auto mode falls back quietly
            and says so in the summary line.
        strategy: ``"mirrored"`` forces a ``MirroredStrategy`` over all local devices
            of the chosen kind (several logical CPUs in tests), ``"default"`` forces
            the default strategy. ``None`` picks by the table in the module docstring.
        mixed_precision: ``True`` enables ``mixed_bfloat16`` on TPU and
            ``mixed_float16`` on GPU and leaves the CPU in float32; a policy name
            (e.g. ``"mixed_bfloat16"``) is applied on any device.
        backend: ``"tensorflow"`` or ``"jax"``. Only honoured before Keras is first
            imported; afterwards it must match the backend in use.
        verbose: Print the one-line summary.

    Returns:
        The ``Accelerator``.

    Raises:
        AcceleratorNotFound: A forced device is not present.
        ValueError: Unknown ``device`` or ``strategy``, or a backend mismatch.
    """
    device = (device or os.environ.get(DEVICE_ENV) or "auto").lower()
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    if strategy not in (None, "mirrored", "default"):
        raise ValueError(
            f"strategy must be None, 'mirrored' or 'default', got {strategy!r}"
        )

    backend_name = _choose_backend(backend, device)
    if backend_name == "jax":
        acc = _connect_jax(device, strategy)
    else:
        acc = _connect_tf(device, strategy)
    _set_precision(acc, mixed_precision)
    if verbose:
        print(acc.summary)
    return acc


# ---------------------------------------------------------------------------
# Backend choice


def _tpu_vm_hints() -> list[str]:
    """Signs that this machine has a TPU attached (without importing a framework)."""
    hints = [
        k
        for k in ("TPU_NAME", "ISTPUVM", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR")
        if os.environ.get(k)
    ]
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        hints.append("/dev/accel*")
    return hints


def _choose_backend(requested: str | None, device: str) -> str:
    if "keras" in sys.modules:
        import keras

        active = keras.backend.backend()
        if requested and requested != active:
            raise ValueError(
                f"Keras is already running on the {active!r} backend; to use "
                f"{requested!r}, restart the kernel and set "
                f"os.environ['KERAS_BACKEND'] = {requested!r} before importing keras."
            )
        return active
    if requested:
        os.environ["KERAS_BACKEND"] = requested
    elif (
        not os.environ.get("KERAS_BACKEND")
        and device in ("auto", "tpu")
        and _tpu_vm_hints()
        and importlib.util.find_spec("jax") is not None
    ):
        # Kaggle's TPU image: tensorflow-cpu cannot see the TPU, JAX can.
        os.environ["KERAS_BACKEND"] = "jax"
    import keras

    return keras.backend.backend()


# ---------------------------------------------------------------------------
# TensorFlow backend


def _connect_tf(device: str, strategy: str | None) -> Accelerator:
    from shopee_tpu.utils import require_tensorflow

    tf = require_tensorflow()
    notes: list[str] = []

    if device in ("auto", "tpu") and strategy is None:
        if device == "tpu" or _tpu_vm_hints():
            tpu_strategy, problem = _tf_tpu_strategy(tf)
            if tpu_strategy is not None:
                return Accelerator(
                    kind="tpu",
                    replicas=tpu_strategy.num_replicas_in_sync,
                    backend="tensorflow",
                    strategy=tpu_strategy,
                    devices=[d.name for d in tf.config.list_logical_devices("TPU")],
                )
            if device == "tpu":
                raise AcceleratorNotFound(
                    "connect(device='tpu'): no TPU found. Looked for "
                    f"TPUClusterResolver(tpu={_tpu_name()!r}) (TPU_NAME, else 'local' "
                    f"for a TPU VM) with the TensorFlow backend: {problem}. On Kaggle's "
                    "TPU image TensorFlow is CPU-only; set KERAS_BACKEND=jax before "
                    "importing keras."
                )
            notes.append(f"no TPU ({problem})")
        else:
            notes.append("no TPU found")

    if device == "tpu":
        raise AcceleratorNotFound(
            f"connect(device='tpu') with strategy={strategy!r}: "
            "TPUs only run under TPUStrategy"
        )

    gpus = tf.config.list_logical_devices("GPU")
    if device == "gpu" and not gpus:
        raise AcceleratorNotFound(
            "connect(device='gpu'): TensorFlow lists no GPU "
            "(tf.config.list_logical_devices('GPU') is empty; is tensorflow-cpu installed?)"
        )
    kind = "gpu" if gpus and device != "cpu" else "cpu"
    if device == "auto" and kind == "cpu":
        notes.append("no GPU found")
    local = gpus if kind == "gpu" else tf.config.list_logical_devices("CPU")

    if os.environ.get("TF_CONFIG") and strategy != "default":
        workers, index = _tf_config_workers()
        strat = tf.distribute.MultiWorkerMirroredStrategy()
        return Accelerator(
            kind=kind,
            replicas=strat.num_replicas_in_sync,
            backend="tensorflow",
            strategy=strat,
            num_workers=workers,
            worker_index=index,
            note="; ".join(notes),
            devices=[d.name for d in local],
        )

    if strategy == "mirrored" or (strategy is None and kind == "gpu" and len(gpus) > 1):
        strat = tf.distribute.MirroredStrategy([d.name for d in local])
    else:
        strat = tf.distribute.get_strategy()
    return Accelerator(
        kind=kind,
        replicas=strat.num_replicas_in_sync,
        backend="tensorflow",
        strategy=strat,
        note="; ".join(notes),
        devices=[d.name for d in local],
    )


def _tpu_name() -> str:
    return os.environ.get("TPU_NAME") or "local"


def _tf_tpu_strategy(tf) -> tuple[Any, str]:
    """Returns (TPUStrategy, "") or (None, why it failed)."""
    try:
        # TPU VMs need tpu="local"; the 2020 no-argument call fails there.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=_tpu_name())
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), ""
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, first[:200]


def _tf_config_workers() -> tuple[int, int]:
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        cluster = tf_config.get("cluster", {})
        workers = sum(len(cluster.get(k, [])) for k in ("chief", "worker"))
        task = tf_config.get("task", {})
        index = int(task.get("index", 0))
        if task.get("type") == "worker" and "chief" in cluster:
            index += len(cluster["chief"])
        return max(workers, 1), index
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"TF_CONFIG is set but is not valid JSON of a cluster: {e}"
        ) from e


# ---------------------------------------------------------------------------
# JAX backend


def _connect_jax(device: str, strategy: str | None) -> Accelerator:
    import jax
    import keras

    devices = jax.devices()
    platform = devices[0].platform.lower()
    kind = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
        platform, "cpu"
    )
    notes: list[str] = []
    if device != "auto" and device != kind:
        if device == "cpu":
            devices = jax.devices("cpu")
            kind = "cpu"
        else:
            raise AcceleratorNotFound(
                f"connect(device={device!r}) on the JAX backend: jax.devices() lists "
                f"{len(devices)} {platform} device(s) and no {device.upper()}."
            )
    if device == "auto" and kind == "cpu":
        notes.append("no TPU or GPU found")

    distribution = None
    if strategy != "default" and len(devices) > 1:
        keras_devices = [f"{d.platform}:{d.id}" for d in devices]
        distribution = keras.distribution.DataParallel(devices=keras_devices)
        keras.distribution.set_distribution(distribution)
    return Accelerator(
        kind=kind,
        replicas=len(devices) if distribution is not None else 1,
        backend="jax",
        distribution=distribution,
        num_workers=jax.process_count(),
        worker_index=jax.process_index(),
        note="; ".join(notes),
        devices=[str(d) for d in devices],
    )


# ---------------------------------------------------------------------------
# Precision


def _set_precision(acc: Accelerator, mixed_precision: bool | str) -> None:
    import keras

    if isinstance(mixed_precision, str):
        policy = mixed_precision
    elif mixed_precision:
        policy = _POLICIES.get(acc.kind, "float32")
        if policy == "float32":
            acc.note = "; ".join(filter(None, [acc.note, "mixed precision off on CPU"]))
    else:
        policy = "float32"
    keras.mixed_precision.set_global_policy(policy)
    acc.precision = policy
