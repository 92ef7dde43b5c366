"""The JAX side of ``connect()``: every host joins one runtime, then
``keras.distribution.DataParallel`` spreads the global batch over all their
devices."""

from __future__ import annotations

import os
from typing import Any

from shopee_tpu.hardware.tpu_vm import AcceleratorNotFound, out_of_reach, tpu_vm_hints
from shopee_tpu.multihost import initialize_hosts

__all__ = ["setup"]


def setup(device: str, strategy: str | None) -> dict[str, Any]:
    """The ``Accelerator`` fields for the JAX backend (see ``connect``)."""
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
        if tpu_vm_hints() and os.environ.get("JAX_PLATFORMS", "") != "cpu":
            raise out_of_reach(
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
    return dict(
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
