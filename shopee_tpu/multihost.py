"""What the processes of one run share: joining, waiting, agreeing and gathering.

A TPU pod slice larger than one VM (v5e-16 and up) runs the same program on every
host, one process each. On the JAX backend those processes join one runtime with
``keras.distribution.initialize()`` before JAX starts; ``jax.devices()`` then lists
every host's devices, one ``DataParallel`` spans them, and each host feeds the rows
of its own devices. ``connect()`` joins when:

- Keras's own variables are set: ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the
  coordinator's ``host:port`` first), ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and
  ``KERAS_DISTRIBUTION_PROCESS_ID`` (any launcher, or processes on one machine);
- or the TPU runtime names several hosts (``TPU_WORKER_HOSTNAMES`` or
  ``TPU_PROCESS_ADDRESSES`` with more than one entry, as GKE sets them, or
  ``MEGASCALE_NUM_SLICES`` above 1);
- or the slice has more chips than one host holds: ``TPU_ACCELERATOR_TYPE`` or,
  on a TPU VM without it (slices made with ``gcloud``), the GCE metadata server's
  ``accelerator-type``, e.g. ``v5litepod-16``. A single host holds at most 8 of
  what the type counts (chips for v5e and v6e, TensorCores for v2-v4 and v5p).

In the last two cases JAX finds its peers itself (TPU environment or metadata).
Kaggle's single-host v5e-8 (``TPU_PROCESS_ADDRESSES=local``) never waits for peers.

The other helpers (``barrier``, ``broadcast_from_chief``, ``gather``, ``agree``)
are what ``Accelerator.sync``/``from_chief``, the training loop and the run-folder
check use so that every process takes the same decisions and only process 0
writes; ``replicated_call`` is how a prediction over every host's devices comes
back whole to each host (``inference.tta.hosts_call``).
"""

from __future__ import annotations

import glob
import os
import re
import urllib.request

import numpy as np

from shopee_tpu.utils import require_tensorflow

__all__ = [
    "KERAS_ENV",
    "multi_host_reason",
    "initialize_hosts",
    "barrier",
    "broadcast_from_chief",
    "gather",
    "allgather",
    "spans_hosts",
    "replicated_call",
    "agree",
]

KERAS_ENV = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
_TPU_HOST_LISTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


def multi_host_reason(
    environ: dict[str, str] | None = None, *, metadata=None
) -> str | None:
    """Why this process should join others, or ``None``.

    Args:
        environ: The environment (default ``os.environ``).
        metadata: A function returning the slice's accelerator type from the GCE
            metadata server, asked only on a TPU VM without the variables
            (default: ``gce_accelerator_type``).
    """
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in KERAS_ENV):
        n = env.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
        if n is not None and n.strip() == "1":
            return None
        return "KERAS_DISTRIBUTION_* variables"
    for key in _TPU_HOST_LISTS:
        hosts = [h for h in env.get(key, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"TPU slice of {len(hosts)} hosts ({key})"
    if int(env.get("MEGASCALE_NUM_SLICES") or 1) > 1:
        return "multislice TPU (MEGASCALE_NUM_SLICES)"
    if env.get("TPU_PROCESS_ADDRESSES", "").strip() == "local":
        return None  # the runtime says: this host alone (Kaggle's v5e-8)
    kind, source = env.get("TPU_ACCELERATOR_TYPE"), "TPU_ACCELERATOR_TYPE"
    if not kind and _tpu_device_files():
        kind, source = (metadata or gce_accelerator_type)(), "GCE metadata"
    if kind and _slice_size(kind) > HOST_SLICE_SIZE:
        return f"TPU slice {kind} ({source}), more than one host"
    return None


# What an accelerator type counts (chips, or TensorCores before v5e): one host
# holds at most 8 of them (v2-8 .. v5p-8, v5litepod-8, v6e-8).
HOST_SLICE_SIZE = 8


def _slice_size(accelerator_type: str) -> int:
    match = re.fullmatch(r"\s*[a-z0-9]+-(\d+)\s*", accelerator_type.lower())
    return int(match[1]) if match else 0


def _tpu_device_files() -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def gce_accelerator_type(timeout: float = 2.0) -> str | None:
    """This TPU VM's accelerator type from the GCE metadata server (``None`` when
    it cannot be had: not on Google Cloud, or no answer within ``timeout``)."""
    url = (
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
        "accelerator-type"
    )
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.read().decode().strip() or None
    except OSError:
        return None


def initialize_hosts() -> None:
    """Joins the other processes (JAX backend) when the environment says so; does
    nothing when ``jax.distributed`` is already initialized (a second ``connect()``,
    or a caller that initialized it with its own arguments).

    Raises:
        RuntimeError: Joining failed; the message names the variables used.
    """
    reason = multi_host_reason()
    if reason is None:
        return
    import jax

    if jax.distributed.is_initialized():
        return
    _cpu_collectives(jax)
    import keras

    try:
        keras.distribution.initialize()
    except (RuntimeError, ValueError) as e:
        names = {k: os.environ.get(k) for k in KERAS_ENV if os.environ.get(k)}
        raise RuntimeError(
            f"joining the other processes ({reason}; {names or 'TPU runtime'}) "
            f"failed: {e}. Call shopee_tpu.connect() before any JAX computation, "
            "and start every process with the same coordinator address and count."
        ) from e


def _cpu_collectives(jax) -> None:
    """Cross-process collectives on CPU need an implementation: gloo (the default
    since jax 0.4.3x; older versions had none, and their all-reduce failed)."""
    try:
        if not jax.config.jax_cpu_collectives_implementation:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option: nothing to choose
        pass


# ---------------------------------------------------------------------------
# Collectives between the processes of a run (the Accelerator calls these only
# when there are several processes).


def barrier(acc, name: str) -> None:
    """Blocks until every process reaches ``barrier(acc, name)``."""
    if acc.backend == "jax":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
    else:
        _tf_first_replica(acc.strategy, 0.0)


def broadcast_from_chief(acc, value: float) -> float:
    """Process 0's ``value`` on every process."""
    if acc.backend == "jax":
        from jax.experimental import multihost_utils

        return float(multihost_utils.broadcast_one_to_all(np.float32(value)))
    return _tf_first_replica(acc.strategy, value)


def _tf_first_replica(strategy, value: float) -> float:
    """The value of replica 0 (the chief's first) on every worker: an all-reduce
    to which the other replicas add zero."""
    tf = require_tensorflow()

    def offer():
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return tf.where(first, tf.constant(value, tf.float32), 0.0)

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(offer), axis=None)
    return float(total)


def gather(acc, local: np.ndarray) -> np.ndarray:
    """Concatenates every process's ``local`` rows in process order (every process
    passes the same shape)."""
    if acc.num_workers == 1:
        return np.asarray(local)
    if acc.backend == "jax":
        return allgather(local)
    return _tf_gather(acc.strategy, np.asarray(local), acc.num_workers)


def _tf_gather(strategy, local: np.ndarray, workers: int) -> np.ndarray:
    """Every worker's ``local`` through the strategy's replicas (worker-major); a
    worker with several replicas offers it once per replica, so one is kept."""
    tf = require_tensorflow()
    value = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local)
    )
    out = np.asarray(strategy.gather(value, axis=0))
    per_worker = out.reshape(workers, -1, *local.shape)
    return np.concatenate(list(per_worker[:, 0]), axis=0)


def allgather(local: np.ndarray) -> np.ndarray:
    """Every JAX process's ``local`` rows, concatenated in process order (``local``
    itself in a single process)."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def spans_hosts(distribution) -> bool:
    """Whether a ``keras.distribution`` places arrays on several processes' devices."""
    if distribution is None:
        return False
    devices = distribution.device_mesh.backend_mesh.devices.flat
    return len({d.process_index for d in devices}) > 1


def replicated_call(distribution, fn):
    """``fn(state, *arrays)`` compiled once over a distribution's devices, its
    outputs whole on every host.

    Keras's ``predict_on_batch`` ends in ``np.array(output)``, which JAX refuses
    for an array that spans other hosts' devices ("Fetching value for
    `jax.Array` that spans non-addressable devices"; jax 0.7.2, Kaggle's, and
    0.10 alike). Here the compiled call itself replicates its outputs (one
    all-gather over the devices, inside the same program), and a replicated array
    is read from a local copy. ``state`` (e.g. the model's variable values) is
    passed as it is; each array's rows are split over every device, as ``fit``
    splits a batch.

    Returns:
        ``call(state, *arrays, host_rows=False)`` -> ``fn``'s outputs as numpy.
        By default the arrays are the global batch, the same on every host: each
        host hands its devices their rows of it. With ``host_rows=True`` they are
        this host's rows only (as ``fit`` is fed) and the outputs hold every
        host's rows, in the order of the global batch. Every process must make
        the same calls with the same shapes.
    """
    import jax

    mesh = distribution.device_mesh.backend_mesh
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    run = jax.jit(fn, out_shardings=whole)

    def rows(array: np.ndarray, host_rows: bool):
        layout = distribution.get_data_layout(array.shape).backend_layout
        if host_rows:
            return jax.make_array_from_process_local_data(layout, array)
        return jax.make_array_from_callback(array.shape, layout, lambda i: array[i])

    def call(state, *arrays, host_rows: bool = False):
        inputs = [rows(np.asarray(a), host_rows) for a in arrays]
        return jax.tree.map(np.asarray, run(state, *inputs))

    return call


def agree(
    value: int, what: str, *, acc=None, hint: str = "every host must pass the same"
) -> None:
    """Raises on every process when the processes' ``value`` differ (e.g. before a
    loop of collectives: a process that stops early leaves the others waiting for
    ever).

    Args:
        value: This process's value.
        what: What it is, for the message.
        acc: The ``Accelerator`` (any backend); without it, JAX's processes.
        hint: What to do about a difference.

    Raises:
        ValueError: One line naming ``what`` and each process's value.
    """
    local = np.array([value], np.int32)
    values = (allgather(local) if acc is None else gather(acc, local)).tolist()
    if len(set(values)) > 1:
        each = ", ".join(f"host {i}: {v}" for i, v in enumerate(values))
        raise ValueError(f"{what} differs between the hosts ({each}); {hint}")
