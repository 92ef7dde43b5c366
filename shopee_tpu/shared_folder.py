"""Whether every host of a run sees the one folder the chief writes.

On a pod slice each host runs the same program; only the chief (process 0) writes
the run folder and the others read what it committed: the epoch to resume from,
then the best weights at the end. A folder on each host's own disk breaks this
quietly: a host that finds no ``best.weights.h5`` skips a weight load that the
others make, and every multi-host weight load is a collective, so they wait for
ever; a host that sees another epoch resumes from it. So a run starts with a
check, and a folder that some host does not see is refused on every host in one
line that names the folder and the host.

How: the chief writes a fresh token into the folder (a folder only read, such as
a finished run in a Kaggle input, has none), every host reads the token and the
run's ``state.json`` and ``config.json``, and the hosts compare what they read with
the chief's. Identical copies of a finished run pass, as they should for reading;
a folder being written must be the same one, which the token shows. A shared disk
may show a new file to the other hosts a little late (NFS caches what a folder
holds for some seconds), so a host that differs reads again for a while before the
hosts decide.
"""

from __future__ import annotations

import os
import socket
import time
import zlib

import numpy as np

from shopee_tpu import fs, multihost
from shopee_tpu.run_folder import RunFolder

__all__ = ["UnsharedFolder", "check_shared", "TOKEN"]

TOKEN = ".hosts-token"  # written by the chief, read by every host
_READ = (TOKEN, "state.json", "config.json")
_NAME_BYTES = 64


class UnsharedFolder(ValueError):
    """Some host does not see the run folder the chief writes or reads."""


def check_shared(acc, path: str, *, chief_writes: bool, wait: float = 20.0) -> None:
    """Refuses, on every host, a run folder that some host does not see.

    Every process must call it at the same point. Nothing happens on one process.

    Args:
        acc: The ``Accelerator`` (its ``num_workers``, ``worker_index``, ``sync``).
        path: The run folder.
        chief_writes: The chief writes the folder (training): it writes a fresh
            token that every host must read. ``False``: a folder only read.
        wait: Seconds a host that reads something else than the chief keeps
            reading again (a shared disk's caches) before the hosts decide.

    Raises:
        UnsharedFolder: One line naming the folder, the hosts that do not see it
            and the chief.
    """
    if acc.num_workers == 1:
        return
    path = os.fspath(path)
    if chief_writes and acc.chief:
        fs.write_text(fs.join(path, TOKEN), f"{os.urandom(8).hex()}\n")
    acc.sync("shopee_tpu.shared_folder.written")
    chiefs = int(multihost.gather(acc, np.array([_fingerprint(path)], np.int32))[0])
    mine, deadline = _fingerprint(path), time.monotonic() + wait
    while mine != chiefs and time.monotonic() < deadline:
        time.sleep(0.5)
        mine = _fingerprint(path)
    same = multihost.gather(acc, np.array([mine == chiefs], np.int32))
    names = multihost.gather(acc, _name_bytes())
    if chief_writes and acc.chief:
        fs.remove(fs.join(path, TOKEN))
    if not same.all():
        raise UnsharedFolder(_refusal(path, same, names, chief_writes))


def _fingerprint(path: str) -> int:
    """A checksum of what this host reads of the folder (missing files count)."""
    crc = 0
    for name in _READ:
        where = fs.join(path, name)
        text = fs.read_text(where) if fs.exists(where) else f"<no {name}>"
        crc = zlib.crc32(f"{name}\0{text}\0".encode(), crc)
    return crc & 0x7FFFFFFF  # int32: what JAX gathers without 64-bit types


def _name_bytes() -> np.ndarray:
    name = socket.gethostname().encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    # int32: TensorFlow's all-gather takes no uint8.
    return np.frombuffer(name, np.uint8).astype(np.int32)


def _refusal(path: str, same: np.ndarray, names: np.ndarray, writes: bool) -> str:
    hosts = names.reshape(len(same), _NAME_BYTES)

    def host(i: int) -> str:
        name = bytes(hosts[i].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
        return f"host {i} ({name})"

    others = [host(i) for i in np.flatnonzero(same == 0)]
    verb = "writes" if writes else "reads"
    return (
        f"{path}: {', '.join(others)} of {len(same)} {'does' if len(others) == 1 else 'do'} "
        f"not see the run folder that {host(0)} {verb}; every host must see one "
        "folder: a gs:// bucket or a disk they share"
    )


def open_training_run(config, acc) -> RunFolder:
    """The run folder, opened by the chief first: it completes an interrupted
    commit and saves the config; the other processes then only read, after
    checking that they see the folder the chief writes. Every host resumes from
    the chief's committed epoch."""
    if acc.chief:
        folder = RunFolder(config.out_dir)
        folder.check_config(config)
    check_shared(acc, config.out_dir, chief_writes=True)
    if not acc.chief:
        folder = RunFolder(config.out_dir, writable=False)
        folder.check_config(config, write=False)
    if acc.num_workers > 1:  # the check compared the state each host read
        multihost.agree(
            folder.epoch,
            f"{config.out_dir}: the committed epoch",
            acc=acc,
            hint="is another run writing to this folder?",
        )
    return folder
