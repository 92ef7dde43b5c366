"""The TensorFlow side of ``connect()``: a ``TPUStrategy`` on a TPU, a
``MirroredStrategy`` over several GPUs, a ``MultiWorkerMirroredStrategy`` from
``TF_CONFIG``, else the default strategy."""

from __future__ import annotations

import os
from typing import Any

from shopee_tpu.hardware.tpu_vm import AcceleratorNotFound, out_of_reach, tpu_vm_hints
from shopee_tpu.utils import require_tensorflow

__all__ = ["setup"]


def setup(device: str, strategy: str | None, early: str | None) -> dict[str, Any]:
    """The ``Accelerator`` fields for the TensorFlow backend (see ``connect``)."""
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
        return _fields(tf, kind, strat, num_workers=workers, worker_index=index)

    if device == "tpu" and strategy is not None:
        raise ValueError(f"device='tpu' runs TPUStrategy; got strategy={strategy!r}")
    notes = []
    tpu_hint = tpu_vm_hints() or os.environ.get("TPU_NAME")  # TPU VM or named TPU
    if device == "tpu" or (device == "auto" and strategy is None and tpu_hint):
        tpu_strategy, problem = _tf_tpu_strategy(tf)
        if tpu_strategy is not None:
            return _fields(tf, "tpu", tpu_strategy)
        if device == "tpu":
            raise AcceleratorNotFound(
                "connect(device='tpu'): no TPU found on the TensorFlow backend. "
                f"Looked for TPUClusterResolver(tpu={_tpu_name()!r}) ('local' = "
                f"this TPU VM; set TPU_NAME for a named TPU): {problem}. On Kaggle's "
                "TPU image TensorFlow is CPU-only: set os.environ['KERAS_BACKEND'] "
                "= 'jax' before importing keras or tensorflow."
            )
        if tpu_vm_hints():
            raise out_of_reach("tensorflow", problem, early)
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
    return _fields(tf, kind, strat, note="; ".join(notes))


def _fields(tf, kind: str, strat, **extra) -> dict[str, Any]:
    try:
        devices = list(strat.extended.worker_devices)
    except RuntimeError:  # the default strategy: the first local device
        devices = [d.name for d in tf.config.list_logical_devices(kind.upper())[:1]]
    # Keras 3 (checked with 3.15) fails to run several steps per call under a
    # TensorFlow strategy with several replicas ("You must feed a value for
    # placeholder tensor ... while/cond/Placeholder", keras-team/keras#19246).
    several = strat.num_replicas_in_sync > 1 and kind != "tpu"
    return dict(
        kind=kind,
        replicas=strat.num_replicas_in_sync,
        backend="tensorflow",
        strategy=strat,
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
