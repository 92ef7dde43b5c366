"""Benchmarks behind ``shopee-tpu bench``. Each prints machine-readable JSON.

The machine is noisy, so every comparison runs its contenders in rounds, with the
order reversed every other round, and reports the median over rounds with the
spread (min and max). Each contender runs for a fixed time per round
(``timed_rate``), so a round is long enough not to swing with one hiccup. Only
ratios measured in one run compare across machines; every result carries the
machine's core count and load average (``machine``).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

# The benchmarks by name: ``shopee-tpu bench NAME`` imports only the one it runs.
BENCHES = {
    "input": "shopee_tpu.bench.input",
    "train": "shopee_tpu.bench.train",
    "predict": "shopee_tpu.bench.predict",
    "accuracy": "shopee_tpu.bench.accuracy",
    "ablation": "shopee_tpu.bench.ablation",
    "cdiscount": "shopee_tpu.bench.cdiscount",
    "export": "shopee_tpu.bench.export",
    "fashion": "shopee_tpu.bench.fashion",
}
_MARK = "@@bench "


def run_bench(what: str, args) -> dict:
    """Runs the named benchmark with the CLI arguments; returns its figures."""
    module = importlib.import_module(BENCHES[what])
    before = machine()
    result = module.run(args)
    result["machine"] = {**before, "load_average_after": machine()["load_average"]}
    return result


def machine() -> dict:
    """Cores this process may use, the CPU model, how many of those cores are
    hardware threads of one physical core, and the 1/5/15-minute load average."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return {
        "cores": len(cpus),
        "cpu_model": _cpu_model(),
        "threads_per_core": _threads_per_core(cpus),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return None


def _threads_per_core(cpus: list[int]) -> int | None:
    """The most of ``cpus`` that share one physical core (2: SMT siblings, which
    share one core's execution units, so 2 of them do not decode twice as fast)."""
    most = 0
    for cpu in cpus:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:  # not Linux
            return None
        siblings = set()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            siblings.update(range(int(lo), int(hi or lo) + 1))
        most = max(most, len(siblings & set(cpus)))
    return most


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The contender order of each round: as given, then reversed, alternately."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def alternate(
    contenders: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Calls each contender once per round, the order reversed every other round;
    returns each contender's results (e.g. rates) per round."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for order in round_orders(list(contenders), rounds):
        for name in order:
            results[name].append(float(contenders[name]()))
    return results


def timed_rate(step: Callable[[], int], seconds: float) -> float:
    """Calls ``step`` (which returns how many items it processed) until at least
    ``seconds`` have passed; returns items per second over the whole window."""
    start = time.perf_counter()
    n = 0
    while True:
        n += step()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median of the per-round ratios a/b (rounds paired in order)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios a/b."""
    return [x / y for x, y in zip(a, b, strict=True)]


def spread(values: list[float], digits: int = 3) -> dict:
    """Median, min and max over rounds, and the rounds themselves."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "rounds": [round(v, digits) for v in values],
    }


def mean_std(values, digits: int = 4) -> dict:
    """Mean and standard deviation over seeds (0 for one seed)."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), digits), "std": round(sd, digits)}


def seeds_from(args, default: list[int]) -> list[int]:
    """``--seeds 0,1,2``, else ``--seed S``, else ``default``."""
    text = getattr(args, "seeds", None)
    if text:
        return [int(s) for s in str(text).split(",") if s.strip()]
    seed = getattr(args, "seed", None)
    return [int(seed)] if seed is not None else list(default)


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` real photo crops (scikit-learn's two sample photos) resized to ``size``,
    as float32 pixels in 0..255: realistic inputs with no download."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(size, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)
    return out


def say(obj) -> None:
    """A worker's answer to its parent: one marked JSON line on stdout."""
    print(_MARK + json.dumps(obj), flush=True)


class Worker:
    """A benchmark worker process (one Keras backend, one thread setting...),
    spoken to over stdin/stdout: each command line gets one ``say`` answer.

    Args:
        name: For error messages.
        code: The Python code the process runs (it answers ``say`` lines).
        env: Environment variables on top of this process's.
    """

    def __init__(self, name: str, code: str, env: dict):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        raise RuntimeError(
            f"bench: the {self.name} worker exited "
            f"({self.proc.wait()}) without answering:\n{tail}"
        )

    def ask(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()
