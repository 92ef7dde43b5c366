"""``shopee-tpu bench fashion``: Fashion-MNIST's official test, ours against the
script a competent Keras user writes, at the same wall time.

Fashion-MNIST is 70,000 photographs of Zalando catalogue products, 28 x 28 grey,
10 classes: 60,000 to train on and the official 10,000 to test on. It reads the
original idx files from a folder: ``--data``, else Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), else Keras's
cache (``~/.keras/datasets/fashion-mnist``).

Two contenders, each given ``--budget`` seconds of wall time (13 minutes by
default), everything after the idx files inside it:

* **ours**: the library's own path, as a user runs it: the arrays into records
  (``write_arrays``), ``train`` with the ``small-images`` preset and the
  budget's remainder as its time limit (which plans the schedule to fit, with
  the prediction after it), then ``predict`` with the preset's TTA;
* **the peer** (``shopee_tpu.bench.fashion_peer``): reads the same files into
  arrays, trains a VGG-style CNN for a fixed number of epochs, predicts with
  flip TTA. A user picks the epoch count that fits the time from an earlier run;
  here one calibration run before the seeds times the peer's epochs and its
  prediction on this machine (outside every budget) and sets the count, and a
  guard stops the peer before an epoch that would end past the budget.

Seeds run one after another, the contenders' order alternating from seed to
seed. ``--split final`` (the default) trains on all 60,000 images and scores the
official test; ``--split tuning`` trains on 50,000 and scores the 10,000 held
out of the training files (1,000 a class, a fixed draw), where every recipe
choice, ours and the peer's, was made. The report gives each run and, over the
seeds, the mean and standard deviation of both accuracies, the gain and the
time ratio.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import keras
import numpy as np

from shopee_tpu import fs
from shopee_tpu.bench import mean_std, round_orders, seeds_from
from shopee_tpu.bench.accuracy import MARGIN, summarize, within
from shopee_tpu.bench.fashion_peer import BATCH, peer_model, run_fashion_peer
from shopee_tpu.bench.peer import compile_peer
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read.pipeline import load_dataset, read_ids_labels
from shopee_tpu.data.write.arrays import write_arrays
from shopee_tpu.data.write.idx import read_idx_pair
from shopee_tpu.inference.tta import predict
from shopee_tpu.training import train

DATA_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.keras/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
BUDGET = 780.0  # seconds per contender and seed: 3 seeds x 2 in about 80 minutes
PRESET = "small-images"
# The peer's settings, chosen on the tuning split (docs/benchmarks.md).
PEER_WIDTH, PEER_LEARNING_RATE = 32, 3e-3
TUNING_PER_CLASS, TUNING_DRAW = 1000, 1234
# --quick: a smoke run of the code on small idx files (the tests write them).
QUICK = dict(
    budget=240.0,
    ours=(
        "model.backbone=small-resnet-w4",
        "epochs=3",
        "batch_size=16",
        "optim.ema_momentum=0.9",  # 36 steps in all: a slower average stays at init
    ),
    peer_width=4,
    peer_epochs=2,  # at most: the calibration is run, its count capped
)


def find_data(folder: str | None = None) -> str:
    """The folder holding the four idx files (gzipped or not).

    Raises:
        FileNotFoundError: One line naming where it looked and what to install.
    """
    places = [folder] if folder else list(DATA_DIRS)
    for place in places:
        place = os.path.expanduser(place)
        if all(_idx_path(place, name) for pair in FILES.values() for name in pair):
            return place
    looked = " or ".join(os.path.expanduser(p) for p in places)
    raise FileNotFoundError(
        f"no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz] and the other "
        f"three) in {looked}: `apt-get install dataset-fashion-mnist`, or pass "
        "--data DIR"
    )


def _idx_path(folder: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if fs.exists(path):
            return path
    return None


def load_split(folder: str, split: str):
    """``(x_train, y_train, x_test, y_test)`` of ``split``: ``final`` is the
    official one; ``tuning`` holds out ``TUNING_PER_CLASS`` training images of
    each class (a fixed draw, at most a fifth of a class) as its test."""
    x, y = read_idx_pair(*(_idx_path(folder, n) for n in FILES["train"]))
    if split == "final":
        return (x, y, *read_idx_pair(*(_idx_path(folder, n) for n in FILES["test"])))
    if split != "tuning":
        raise ValueError(f"--split {split!r}: expected tuning or final")
    rng = np.random.default_rng(TUNING_DRAW)
    held = np.zeros(len(y), bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = min(TUNING_PER_CLASS, len(members) // 5)
        held[rng.choice(members, n, replace=False)] = True
    return x[~held], y[~held], x[held], y[held]


def run_ours(
    folder: str, out: str, *, seed: int, split: str, budget: float, sets=()
) -> dict:
    """Records, ``train`` (the ``small-images`` preset) and ``predict`` within
    ``budget`` seconds; accuracy and times."""
    start, cpu = time.perf_counter(), time.process_time()
    x_train, y_train, x_test, y_test = load_split(folder, split)
    names = list(CLASSES[: int(max(y_train.max(), y_test.max())) + 1])
    records = {k: os.path.join(out, "records", k) for k in ("train", "test")}
    write_arrays(x_train, y_train, records["train"], names, shards=16, seed=0, verbose=False)  # fmt: skip
    write_arrays(x_test, y_test, records["test"], names, shards=2, seed=0, verbose=False)  # fmt: skip
    written = time.perf_counter() - start
    cfg = RunConfig.preset(PRESET).override(
        f"data.train={records['train']}",
        f"data.image_size={x_train.shape[1]}",
        f"seed={seed}",
        f"out_dir={os.path.join(out, 'run')}",
        "data.valid_fraction=0",
        *sets,
    )
    limit = budget - (time.perf_counter() - start)
    result = train(cfg, time_limit=limit, predict_images=len(x_test), verbose=0)
    trained = time.perf_counter() - start
    test = load_dataset(
        records["test"],
        image_size=result.model.input_shape[1],
        batch_size=256,
        training=False,
    )
    _, probs = predict(result.model, test, tta=cfg.predict.tta, reduce=cfg.predict.reduce)  # fmt: skip
    labels = read_ids_labels(records["test"])["label"].to_numpy()
    m = result.metrics
    return {
        "preset": PRESET,
        "backbone": cfg.model.backbone,
        "tta": list(cfg.predict.tta),
        "test_accuracy": round(float((np.argmax(probs, -1) == labels).mean()), 4),
        "wall_time_sec": round(time.perf_counter() - start, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "records_sec": round(written, 1),
        "predict_sec": round(time.perf_counter() - start - trained, 1),
        "epochs": m["epochs_completed"],
        "epochs_planned": m["epochs"],
        "epochs_asked": m["epochs_asked"],
        "stop_reason": m["stop_reason"],
        "train_images": m["train_images"],
        "images_per_sec": m["images_per_sec"],
    }


def calibrate_peer(folder: str, split: str, budget: float, width: int) -> dict:
    """The peer's epoch count for ``budget``, from a short run on this machine
    (as a user sets it from an earlier run): reading the files, tracing, a
    steady epoch's time from timed steps, and the two-view prediction."""
    start = time.perf_counter()
    x, y, x_test, _ = load_split(folder, split)
    loaded = time.perf_counter() - start
    steps = len(x) // BATCH
    model = peer_model(keras, 10, side=x.shape[1], width=width)
    compile_peer(model, 1e-3, 100 * steps, steps)
    x, y = x[..., None], keras.utils.to_categorical(y % 10, 10)
    timed = []
    for n in (2, min(steps, 40), min(steps, 40)):  # the first call traces
        began = time.perf_counter()
        model.fit(x[: n * BATCH], y[: n * BATCH], batch_size=BATCH, verbose=0)
        timed.append((n, time.perf_counter() - began))
    step = min(t / n for n, t in timed[1:])
    trace = max(0.0, timed[0][1] - timed[0][0] * step)
    began = time.perf_counter()
    for view in (x_test, x_test[:, :, ::-1]):
        model.predict(view[..., None], batch_size=512, verbose=0)
    predict = time.perf_counter() - began
    usable = budget - loaded - trace - predict - 0.02 * budget
    epochs = max(1, math.floor(usable / (step * steps)))
    return {
        "epochs": epochs,
        "epoch_sec": round(step * steps, 1),
        "trace_sec": round(trace, 1),
        "predict_sec": round(predict, 1),
        "load_sec": round(loaded, 1),
    }


def compare(folder: str, out: str, *, seed: int, order, split, budget, peer_epochs,
            ours_sets=(), peer_width=PEER_WIDTH) -> dict:  # fmt: skip
    """One seed: both contenders in ``order``, each within ``budget``."""
    results = {}
    for name in order:
        if name == "ours":
            where = os.path.join(out, f"ours-{seed}")
            results[name] = run_ours(
                folder, where, seed=seed, split=split, budget=budget, sets=ours_sets
            )
        else:
            results[name] = run_fashion_peer(
                lambda: load_split(folder, split),
                seed=seed,
                epochs=peer_epochs,
                learning_rate=PEER_LEARNING_RATE,
                width=peer_width,
                time_limit=budget,
            )
    peer, ours = results["peer"], results["ours"]
    for side in (peer, ours):
        side["within_budget"] = within(side["wall_time_sec"], budget)
    return {
        "seed": seed,
        "order": list(order),
        "peer": peer,
        "ours": ours,
        "peer_accuracy": peer["test_accuracy_flip_tta"],  # its recipe: flip TTA
        "gain": round(ours["test_accuracy"] - peer["test_accuracy_flip_tta"], 4),
        "time_ratio": round(ours["wall_time_sec"] / peer["wall_time_sec"], 3),
        "speed_ratio": round(ours["images_per_sec"] / peer["images_per_sec"], 3),
    }


def run(args) -> dict:
    """``args``: ``quick``, ``seeds`` (or ``seed``), ``split``, ``data``,
    ``budget``, ``out``, ``sets`` (ours: config overrides, for tuning)."""
    quick = bool(getattr(args, "quick", False))
    folder = find_data(getattr(args, "data", None))
    split = getattr(args, "split", None) or "final"
    seeds = seeds_from(args, [0, 1] if quick else [0, 1, 2])
    budget = float(getattr(args, "budget", None) or (QUICK["budget"] if quick else BUDGET))  # fmt: skip
    width = QUICK["peer_width"] if quick else PEER_WIDTH
    sets = tuple(getattr(args, "sets", None) or ())
    out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="bench-fashion-")
    calibration = calibrate_peer(folder, split, budget, width)
    if quick:
        calibration["epochs"] = min(calibration["epochs"], QUICK["peer_epochs"])
    runs = []
    for seed, order in zip(seeds, round_orders(["peer", "ours"], len(seeds))):
        runs.append(
            compare(
                folder, out, seed=seed, order=order, split=split, budget=budget,
                peer_epochs=calibration["epochs"], peer_width=width,
                ours_sets=(*(QUICK["ours"] if quick else ()), *sets),
            )
        )  # fmt: skip
    speed = [r["speed_ratio"] for r in runs]
    return {
        "benchmark": "fashion",
        "quick": quick,
        "split": split,
        "data": folder,
        "seeds": seeds,
        "budget_sec": budget,
        "margin": MARGIN,
        "ours_sets": list(sets),
        "peer_calibration": calibration,
        "runs": runs,
        **summarize(runs),
        "speed_ratio": mean_std(speed),
    }
