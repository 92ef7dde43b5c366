"""``shopee-tpu bench cdiscount``: the BSON -> TFRecord converter's speed and memory.

On a generated Cdiscount-format ``train.bson`` (``make_cdiscount_sample``: real
180-px JPEGs, 1-4 per product, 10 % duplicates):

- ``workers_1`` / ``workers_n``: products/s and images/s of ``cdiscount prepare``
  (scan, plan, MD5 dictionary, parallel write) from a cold start into an empty
  folder, with 1 and N writer processes, rounds alternated; the median per-round
  ratio ``n_over_1``. On a shared machine other jobs take cores:
  ``median_cores_used`` (CPU seconds / wall seconds) shows how many each contender
  got, ``median_images_per_cpu_second`` what the work costs regardless;
- ``peak_rss``: peak resident memory of the converting process and of its largest
  writer process, each run in a fresh subprocess, at 1x and 10x the products
  (default 2,000 and 20,000). The target is ``ratio <= 1.2``: memory does not grow
  with the file (the index costs about 30 bytes a product and 17 an image).

``--quick`` (100 and 1,000 products, 2 rounds) only exercises the code.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import shopee_tpu
from shopee_tpu.bench import alternate, median_ratio
from shopee_tpu.cdiscount.prepare import prepare_cdiscount
from shopee_tpu.cdiscount.sample import make_cdiscount_sample

IMAGE_SIZE = 180
RSS_TARGET = 1.2

# Peak RSS from /proc's VmHWM, which starts afresh at exec (ru_maxrss would carry
# the forking process's size over), for this process and, sampled every 20 ms, for
# each writer process it starts.
_RSS_CODE = """
import json, os, sys, threading, time
from shopee_tpu.cdiscount.prepare import prepare_cdiscount

def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0

def children():
    me, out = str(os.getpid()), []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.append(d)
        except (OSError, IndexError):
            pass
    return out

peak, done = {}, threading.Event()
def watch():
    while not done.is_set():
        for c in children():
            peak[c] = max(peak.get(c, 0), hwm(c))
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
m = prepare_cdiscount(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), verbose=False)
done.set()
print(json.dumps({
    "parent_kb": hwm("self"),
    "worker_kb": max(peak.values(), default=0),
    "images": m["total"],
}))
"""


def run(args) -> dict:
    """Runs the converter benchmark; returns the figures as a dict."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    n_workers = max(2, cores)
    quick = bool(getattr(args, "quick", False))
    rounds = max(1, int(getattr(args, "rounds", None) or (2 if quick else 5)))
    small = int(getattr(args, "products", None) or (100 if quick else 2000))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-cdiscount-") as tmp:
        t0 = time.perf_counter()
        one = make_cdiscount_sample(
            os.path.join(tmp, "x1"), products=small, test_products=1,
            image_size=IMAGE_SIZE, seed=0,
        )  # fmt: skip
        ten = make_cdiscount_sample(
            os.path.join(tmp, "x10"), products=10 * small, test_products=1,
            image_size=IMAGE_SIZE, seed=1,
        )  # fmt: skip
        generate_s = time.perf_counter() - t0
        rates, cores_used = _throughput(one, tmp, n_workers, rounds)
        rss = {
            f"products_{n}": _peak_rss(info["train"], tmp, n_workers)
            for n, info in ((small, one), (10 * small, ten))
        }
    images_per_product = one["train_images"] / one["train_products"]
    peak_rss = _memory_growth(rss[f"products_{small}"], rss[f"products_{10 * small}"])
    return {
        "quick": quick,
        "products": small,
        "images": one["train_images"],
        "image_size": IMAGE_SIZE,
        "workers_n": n_workers,
        "cores": cores,
        "rounds": rounds,
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "generate_seconds": round(generate_s, 1),
        "throughput": {
            name: _rate_figures(r, cores_used[name], images_per_product)
            for name, r in rates.items()
        },
        "n_over_1": round(median_ratio(rates["workers_n"], rates["workers_1"]), 3),
        "peak_rss": {**rss, **peak_rss},
        "rss_target_met": max(peak_rss["ratio_10x_over_1x"].values()) <= RSS_TARGET,
    }


def _throughput(one: dict, tmp: str, n_workers: int, rounds: int) -> tuple:
    """Products/s per round of converting ``one`` with 1 and ``n_workers`` writers,
    rounds alternated, and the cores each run used: ``(rates, cores_used)``."""
    cores_used: dict[str, list[float]] = {}

    def convert(name: str, workers: int):
        def go() -> float:
            out = os.path.join(tmp, f"rec{workers}")
            shutil.rmtree(out, ignore_errors=True)
            start, cpu = time.perf_counter(), _cpu_seconds()
            prepare_cdiscount(one["train"], out, workers=workers, verbose=False)
            seconds = time.perf_counter() - start
            cores_used.setdefault(name, []).append((_cpu_seconds() - cpu) / seconds)
            return one["train_products"] / seconds

        return go

    contenders = {"workers_1": convert("workers_1", 1)}
    contenders["workers_n"] = convert("workers_n", n_workers)
    return alternate(contenders, rounds), cores_used


def _rate_figures(
    rates: list[float], cores_used: list[float], images_per_product: float
) -> dict:
    """Medians over one contender's rounds (``rates``: products/s per round)."""
    return {
        "products_per_sec": round(statistics.median(rates), 1),
        "images_per_sec": round(statistics.median(rates) * images_per_product, 1),
        "rounds": [round(x, 1) for x in rates],
        "median_cores_used": round(statistics.median(cores_used), 2),
        "median_images_per_cpu_second": round(
            statistics.median(
                x * images_per_product / c
                for x, c in zip(rates, cores_used, strict=True)
            ),
            1,
        ),
    }


def _memory_growth(a: dict, b: dict) -> dict:
    """How peak RSS grows from run ``a`` (1x the products) to run ``b`` (10x)."""
    ratio = {k: round(b[k] / a[k], 3) for k in ("parent_mb", "worker_mb")}
    # What the extra products cost, extrapolated to train.bson's 12.4 M images.
    per_image = (b["parent_mb"] - a["parent_mb"]) * 2**20 / (b["images"] - a["images"])
    return {
        "ratio_10x_over_1x": ratio,
        "target": RSS_TARGET,
        "parent_growth_bytes_per_image": round(per_image, 1),
        "parent_growth_at_12_4M_images_gb": round(per_image * 12.4e6 / 2**30, 2),
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the writers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss(bson_path: str, tmp: str, workers: int) -> dict:
    """Peak RSS of a conversion run in a fresh interpreter (and of its workers)."""
    out = tempfile.mkdtemp(dir=tmp)
    root = os.path.dirname(os.path.dirname(os.path.abspath(shopee_tpu.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CODE, bson_path, out, str(workers)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the RSS subprocess failed:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "parent_mb": round(got["parent_kb"] / 1024, 1),
        "worker_mb": round(got["worker_kb"] / 1024, 1),
        "images": got["images"],
    }
