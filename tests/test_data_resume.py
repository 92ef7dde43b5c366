"""A writer killed mid-run leaves no complete-looking partial shard; a rerun finishes.

The kill is made deterministic with a named pipe (FIFO) standing in for one image:
the writer process that reaches it blocks on ``read()``, so the run is provably in
the middle when SIGKILL arrives. The rerun uses the real image at the same path.
"""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import time

import pandas as pd
from conftest import REPO

from shopee_tpu.data.manifests import read_manifest
from shopee_tpu.data.write.records import write_records


def _table(digits_dir) -> pd.DataFrame:
    csv = pd.read_csv(digits_dir["train_csv"], dtype=str)
    paths = [
        os.path.join(digits_dir["train_images"], c, f)
        for f, c in zip(csv["filename"], csv["category"], strict=True)
    ]
    return pd.DataFrame(
        {"path": paths, "label": csv["category"], "group": csv["group"]}
    )


def _wait_for_reader(fifo: str, proc, timeout: float = 120) -> int:
    """Opens the FIFO's write end once a writer process has it open for reading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Succeeds only while some process has the FIFO open for reading; we
            # keep our end open and never write, so that reader stays blocked.
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the writer never reached the FIFO")


def test_resume_after_sigkill(digits_dir, tmp_path):
    table = _table(digits_dir)
    # A copy of the images, so the shared fixture stays intact when one becomes a FIFO.
    work = tmp_path / "images"
    work.mkdir()
    paths = []
    for i, p in enumerate(table["path"]):
        dst = work / f"{i:04d}-{os.path.basename(p)}"
        dst.write_bytes(open(p, "rb").read())
        paths.append(str(dst))
    table = table.assign(path=paths)
    reference = write_records(
        table, tmp_path / "ref", shards=6, workers=1, image_size=24
    )

    victim = paths[len(paths) // 2]
    real = open(victim, "rb").read()
    os.remove(victim)
    os.mkfifo(victim)
    table.to_pickle(tmp_path / "table.pkl")

    out = tmp_path / "out"
    code = f"""
import pandas as pd
from shopee_tpu.data.write.records import write_records
write_records(pd.read_pickle({str(tmp_path / "table.pkl")!r}), {str(out)!r},
              shards=6, workers=2, image_size=24)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO},
        start_new_session=True,  # its own process group: the writers die with it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fd = None
    try:
        fd = _wait_for_reader(victim, proc)
        deadline = time.monotonic() + 60
        while not glob.glob(str(out / "train-*.tfrec")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if fd is not None:
            os.close(fd)

    finished = sorted(glob.glob(str(out / "train-*.tfrec")))
    partial = glob.glob(str(out / ".train-*.tfrec.tmp-*"))
    assert finished, "no shard was complete at the kill"
    assert partial, "the shard holding the FIFO should be left under a temp name"
    manifest = read_manifest(out)
    assert not manifest["complete"]
    assert len(manifest["shards"]) < len(reference["shards"])
    inodes = {
        f: os.stat(f).st_ino
        for f in finished
        if os.path.basename(f) in manifest["shards"]
    }
    assert inodes

    os.remove(victim)
    with open(victim, "wb") as f:
        f.write(real)
    resumed = write_records(table, out, shards=6, workers=2, image_size=24)
    assert resumed["complete"]
    assert resumed["shards"] == reference["shards"]
    assert resumed["shard_class_counts"] == reference["shard_class_counts"]
    assert resumed["skipped"] == []
    # Shards finished before the kill were kept, not rewritten; no temp file is left.
    assert {f: os.stat(f).st_ino for f in inodes} == inodes
    assert not glob.glob(str(out / ".*tmp*"))
    assert sorted(os.listdir(out)) == sorted([*reference["shards"], "manifest.json"])
