"""``connect()``: find the hardware, set up distribution, return an ``Accelerator``.

With ``shopee_tpu.multihost`` (what several processes share), the only module that
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
import glob
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from shopee_tpu import frameworks, multihost
from shopee_tpu.multihost import initialize_hosts

__all__ = ["Accelerator", "AcceleratorNotFound", "connect"]

DEVICE_ENV = "SHOPEE_TPU_DEVICE"
_DEVICES = ("auto", "tpu", "gpu", "cpu")
_STRATEGIES = (None, "mirrored", "default")
_POLICIES = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}


class AcceleratorNotFound(RuntimeError):
    """A forced device (``connect(device="tpu")``) is not there, or a TPU VM's TPU
    is out of the active backend's reach."""


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
    if device not in _DEVICES:
        raise ValueError(
            f"device must be one of {_DEVICES} (argument or ${DEVICE_ENV}), "
            f"got {device!r}"
        )
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")

    early = frameworks.first_import()  # what fixed Keras's backend, if anything
    if _choose_backend(backend, device) == "jax":
        acc = _connect_jax(device, strategy)
    else:
        acc = _connect_tf(device, strategy, early)
    _set_precision(acc, mixed_precision)
    if verbose:
        print(acc.summary)
    return acc


# ---------------------------------------------------------------------------
# Backend choice


def _tpu_vm_hints() -> list[str]:
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


def _installed(distribution: str) -> bool:
    try:
        return bool(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return False


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
        and _tpu_vm_hints()
        and importlib.util.find_spec("jax") is not None
        # With tensorflow-tpu installed TF owns the TPU (JAX cannot share it).
        and not _installed("tensorflow-tpu")
    ):
        target = "jax"
    if target == "tensorflow":
        from shopee_tpu.utils import require_tensorflow

        require_tensorflow()  # a clear install hint instead of keras' ImportError
    os.environ["KERAS_BACKEND"] = target
    import keras

    return keras.backend.backend()


def _tpu_out_of_reach(
    backend: str, problem: str, early: str | None = None
) -> AcceleratorNotFound:
    """The one-line refusal of auto mode on a TPU VM whose TPU the backend cannot
    use: what says it is a TPU VM, why the backend cannot, what chose it, and the
    ways out."""
    hints = ", ".join(_tpu_vm_hints())
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


# ---------------------------------------------------------------------------
# TensorFlow backend


def _connect_tf(device: str, strategy: str | None, early: str | None) -> Accelerator:
    from shopee_tpu.utils import require_tensorflow

    tf = require_tensorflow()
    # Physical listing does not start TF's runtime; MultiWorkerMirroredStrategy
    # must configure collective ops before anything else starts it.
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise AcceleratorNotFound(
            "connect(device='gpu'): TensorFlow lists no GPU "
            "(tf.config.list_physical_devices('GPU') is empty; is tensorflow-cpu "
            "installed, or CUDA missing?)"
        )
    kind = "gpu" if gpus and device != "cpu" else "cpu"

    if os.environ.get("TF_CONFIG") and strategy is None and device != "tpu":
        strat = _multi_worker_strategy(tf)
        spec = strat.cluster_resolver.cluster_spec().as_dict()
        task, index = strat.cluster_resolver.task_type, strat.cluster_resolver.task_id
        if task == "worker" and "chief" in spec:
            index += len(spec["chief"])  # the chief is worker 0
        workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
        return _tf_accelerator(tf, kind, strat, num_workers=workers, worker_index=index)

    if device == "tpu" and strategy is not None:
        raise ValueError(f"device='tpu' runs TPUStrategy; got strategy={strategy!r}")
    notes = []
    tpu_hint = _tpu_vm_hints() or os.environ.get("TPU_NAME")  # TPU VM or named TPU
    if device == "tpu" or (device == "auto" and strategy is None and tpu_hint):
        tpu_strategy, problem = _tf_tpu_strategy(tf)
        if tpu_strategy is not None:
            return _tf_accelerator(tf, "tpu", tpu_strategy)
        if device == "tpu":
            raise AcceleratorNotFound(
                "connect(device='tpu'): no TPU found on the TensorFlow backend. "
                f"Looked for TPUClusterResolver(tpu={_tpu_name()!r}) ('local' = "
                f"this TPU VM; set TPU_NAME for a named TPU): {problem}. On Kaggle's "
                "TPU image TensorFlow is CPU-only: set os.environ['KERAS_BACKEND'] "
                "= 'jax' before importing keras or tensorflow."
            )
        if _tpu_vm_hints():
            raise _tpu_out_of_reach("tensorflow", problem, early)
        notes.append(f"TensorFlow cannot use the TPU here: {problem}; try JAX")
    if device == "auto" and kind == "cpu":
        notes.append("auto: no TPU or GPU found, fell back to CPU")

    if strategy == "mirrored":
        local = tf.config.list_logical_devices(kind.upper())
        strat = tf.distribute.MirroredStrategy([d.name for d in local])
    elif strategy is None and kind == "gpu" and len(gpus) > 1:
        strat = tf.distribute.MirroredStrategy()
    elif kind == "cpu" and gpus:  # forced CPU: keep variables and ops off the GPUs
        strat = tf.distribute.OneDeviceStrategy("/cpu:0")
    else:
        strat = tf.distribute.get_strategy()
    return _tf_accelerator(tf, kind, strat, note="; ".join(notes))


def _tf_accelerator(tf, kind: str, strat, **extra) -> Accelerator:
    try:
        devices = list(strat.extended.worker_devices)
    except RuntimeError:  # the default strategy: the first local device
        devices = [d.name for d in tf.config.list_logical_devices(kind.upper())[:1]]
    # Keras 3 (checked with 3.15) fails to run several steps per call under a
    # TensorFlow strategy with several replicas ("You must feed a value for
    # placeholder tensor ... while/cond/Placeholder", keras-team/keras#19246).
    several = strat.num_replicas_in_sync > 1 and kind != "tpu"
    return Accelerator(
        kind,
        strat.num_replicas_in_sync,
        "tensorflow",
        strat,
        devices=devices,
        local_replicas=len(devices),
        max_steps_per_execution=1 if several else None,
        **extra,
    )


def _multi_worker_strategy(tf):
    """MultiWorkerMirroredStrategy (cluster from TF_CONFIG), patched for Keras 3,
    whose ``fit`` calls ``reduce`` on a whole ``(x, y)`` batch and with ``axis=0``
    on scalar logs; the stock strategy rejects both (keras-team/keras#20585)."""

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super().reduce

            def reduce_one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return parent(reduce_op, v, None if rank == 0 else axis)

            return tf.nest.map_structure(reduce_one, value)

    return MultiWorkerMirroredStrategy()


def _tpu_name() -> str:
    return os.environ.get("TPU_NAME") or "local"


def _tf_tpu_strategy(tf) -> tuple[Any, str]:
    """Returns (TPUStrategy, "") or (None, why it failed)."""
    try:
        # TPU VMs need tpu="local": the 2020 no-argument call fails there.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=_tpu_name())
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), ""
    except (ValueError, RuntimeError, ImportError, tf.errors.OpError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if "ConfigureDistributedTPU" in text:
            text = "this TensorFlow build has no TPU kernels (tensorflow-cpu?)"
        return None, text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------
# JAX backend


def _connect_jax(device: str, strategy: str | None) -> Accelerator:
    import jax
    import keras

    # Several hosts (a TPU pod slice, or processes named by Keras's variables)
    # join one runtime first; jax.devices() then lists every host's devices.
    initialize_hosts()
    devices = jax.devices()
    platform = devices[0].platform.lower()
    kind = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
        platform, "cpu"
    )
    note = ""
    if device == "cpu" and kind != "cpu":
        devices, kind = jax.devices("cpu"), "cpu"
        jax.config.update("jax_default_device", devices[0])
    elif device not in ("auto", kind):
        install = {"tpu": "jax[tpu]", "gpu": "jax[cuda12]"}[device]
        raise AcceleratorNotFound(
            f"connect(device={device!r}) on the JAX backend: jax.devices() lists "
            f"{len(devices)} {platform} device(s) and no {device.upper()} "
            f"(is `pip install '{install}'` done, and the {device.upper()} attached?)"
        )
    if device == "auto" and kind == "cpu":
        if _tpu_vm_hints() and os.environ.get("JAX_PLATFORMS", "") != "cpu":
            raise _tpu_out_of_reach(
                "jax", f"jax.devices() lists {len(devices)} {platform} device(s)"
            )
        note = "auto: no TPU or GPU found, fell back to CPU"

    # DataParallel: one replica per device of every host, the global batch split
    # along axis 0; each host feeds the rows of its own devices.
    distribution = None
    if jax.process_count() > 1 and strategy == "default":
        raise ValueError(
            f"strategy='default' on {jax.process_count()} JAX processes: every "
            "process would train its own model; drop the strategy argument"
        )
    if strategy != "default" and len(devices) > 1:
        # Each host's pipeline already reads its own records at the host batch
        # (load_dataset's num_workers/worker_index): Keras must not shard and
        # rebatch them again (its default would halve both on 2 hosts).
        distribution = keras.distribution.DataParallel(
            devices=[f"{d.platform}:{d.id}" for d in devices],
            auto_shard_dataset=False,
        )
    keras.distribution.set_distribution(distribution)
    local = [d for d in devices if d.process_index == jax.process_index()]
    return Accelerator(
        kind=kind,
        replicas=len(devices) if distribution is not None else 1,
        backend="jax",
        distribution=distribution,
        num_workers=jax.process_count(),
        worker_index=jax.process_index(),
        note=note,
        devices=[str(d) for d in local],
        local_replicas=len(local) if distribution is not None else 1,
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
            note = "mixed precision stays off on CPU (float32)"
            acc.note = f"{acc.note}; {note}" if acc.note else note
    else:
        policy = "float32"
    keras.mixed_precision.set_global_policy(policy)
    acc.precision = keras.mixed_precision.global_policy().name
