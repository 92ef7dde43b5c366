"""Benchmarks behind ``shopee-tpu bench``. Each prints machine-readable JSON.

The machine is noisy, so every comparison alternates A and B over several rounds
and reports median rates and median ratios.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable

import numpy as np

_BENCHES = {
    "input": "shopee_tpu.bench.input",
    "train": "shopee_tpu.bench.train",
    "predict": "shopee_tpu.bench.predict",
    "cdiscount": "shopee_tpu.bench.cdiscount",
}


def run_bench(what: str, args) -> dict:
    """Runs the named benchmark with the CLI arguments; returns its figures."""
    module = importlib.import_module(_BENCHES[what])
    return module.run(args)


def alternate(
    contenders: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Calls each contender in turn, ``rounds`` times; returns the rates per name.

    Each contender returns a rate (items per second) for one measurement.
    """
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            rates[name].append(float(fn()))
    return rates


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median of the per-round ratios a/b (rounds paired in order)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def timed_rate(fn: Callable[[], int]) -> float:
    """Runs ``fn`` (which returns how many items it processed); returns items/s."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


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
