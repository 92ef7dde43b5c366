"""``shopee-tpu bench input``: our TFRecord pipeline against the decode limit of the
same records, and end to end against ``keras.utils.image_dataset_from_directory``
on the same original JPEGs.

**1. Decode limit** (same records, stored at the training size). Contenders, each
for ``--seconds`` per round, the order reversed every other round:

- ``single_thread``: parse + JPEG decode per record, batch, float32 cast, on one
  thread: the limit per core (the reference);
- ``single_thread_uint8``: the same without the float32 cast (the cast's share);
- ``parallel_decode``: the same function under tf.data's parallel ``map`` on all
  cores, nothing else (what tf.data's threading alone reaches);
- ``ours``: ``load_dataset(training=True)`` with the default augmentation (flip);
- ``ours_no_augment``: the same without augmentation (the flip's share);
- ``ours_private_pool``: ``ours`` on a private thread pool sized to the cores.

Each is reported as a fraction of ``cores x single_thread`` (goal for ``ours``:
>= 0.85), with the cores it really got (CPU seconds / wall seconds) and its images
per CPU-second relative to ``single_thread`` (the work it adds per image).

**2. End to end** from the same folder of original JPEGs (about 500 px): writing the
records once (``cores`` processes) + E epochs of ``ours``, against E epochs of
``image_dataset_from_directory`` (decode + resize of the originals), E = 1, 3, 10,
with the same number of images per epoch on each side and the break-even epoch
count. ``ours`` flips, the directory loader does not augment. The record writer with
1 process is timed too (``writer_n_over_1``).

Without ``--images``, 1,920 JPEGs (30 batches) of about 500 px are made from
scikit-learn's two sample photos (random crops, tints and flips) in a temp folder.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np

from shopee_tpu.bench import machine, ratios, round_orders, spread, timed_rate
from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.decode import decode_image
from shopee_tpu.data.files import list_files
from shopee_tpu.data.pipeline import load_dataset
from shopee_tpu.data.records import write_records

CLASSES = 10
SUFFIXES = (".jpg", ".jpeg")
EPOCHS = (1, 3, 10)
# (images made, their side, training size, batch): full and --quick settings.
FULL = (1920, 500, 224, 64)
QUICK = (64, 96, 32, 16)


def make_images(out_dir: str, n: int = 1920, side: int = 500, seed: int = 0) -> str:
    """Writes ``n`` realistic JPEGs (about ``side`` px) into class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch = int(rng.integers(h // 2, h))
        cw = int(min(w, ch * rng.uniform(1.0, 1.5)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y : y + ch, x : x + cw].astype(np.float32)
        crop = np.clip(crop * rng.uniform(0.7, 1.3, size=3), 0, 255).astype(np.uint8)
        img = Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop)
        scale = side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)))
        folder = os.path.join(out_dir, f"c{i % CLASSES:02d}")
        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"img{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    return out_dir


def _class_layout(images: str, out_dir: str):
    """Symlinks every JPEG below ``images`` into ``out_dir/<parent folder>/``."""
    import pandas as pd

    rows = []
    for dirpath, _, names in sorted(os.walk(images)):
        for name in sorted(names):
            if name.lower().endswith(SUFFIXES):
                label = os.path.basename(dirpath) or "all"
                src = os.path.abspath(os.path.join(dirpath, name))
                dst_dir = os.path.join(out_dir, label)
                os.makedirs(dst_dir, exist_ok=True)
                dst = os.path.join(dst_dir, f"{len(rows):06d}-{name}")
                os.symlink(src, dst)
                rows.append((src, label))
    if not rows:
        raise ValueError(f"no JPEG files under {images}")
    return pd.DataFrame(rows, columns=["path", "label"])


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _reader(make_ds, seconds: float, warmup: int = 2):
    """A contender: builds the dataset, skips ``warmup`` batches (shuffle buffers
    fill, threads start), then reads for ``seconds``; returns (images/s, cores)."""

    def go():
        it = iter(make_ds())
        for _ in range(warmup):
            next(it)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        rate = timed_rate(lambda: int(next(it)[0].shape[0]), seconds)
        cores = (_cpu_seconds() - cpu) / (time.perf_counter() - wall)
        return rate, cores

    return go


def _decode_limit(tf, files, size, batch, cores, seconds, rounds, augment_cfg):
    """Part 1: the contenders over the same records; returns rates and cores."""
    plain = tf.autograph.experimental.do_not_convert
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse_decode(record):
        ex = tf.io.parse_single_example(record, features)
        # Records are stored at the training size: decode only, as ours does.
        return decode_image(ex["image"], size, exact=True), ex["label"]

    def to_float(x, y):
        return tf.cast(x, tf.float32), y

    def single(cast: bool):
        def make():
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = 1
            opts.threading.max_intra_op_parallelism = 1
            opts.autotune.enabled = False
            ds = tf.data.TFRecordDataset(files).repeat().map(plain(parse_decode))
            ds = ds.batch(batch)
            return (ds.map(plain(to_float)) if cast else ds).with_options(opts)

        return make

    def parallel():
        par = dict(num_parallel_calls=cores, deterministic=False)
        ds = tf.data.TFRecordDataset(files).repeat().map(plain(parse_decode), **par)
        return ds.batch(batch).map(plain(to_float), **par).prefetch(2)

    def ours(augment, pool: bool = False):
        def make():
            ds = load_dataset(
                files,
                image_size=size,
                batch_size=batch,
                training=True,
                augment=augment,
                seed=0,
            )
            if pool:
                opts = tf.data.Options()
                opts.threading.private_threadpool_size = cores
                opts.threading.max_intra_op_parallelism = 1
                ds = ds.with_options(opts)
            return ds

        return make

    contenders = {
        "single_thread": _reader(single(True), seconds),
        "single_thread_uint8": _reader(single(False), seconds),
        "parallel_decode": _reader(parallel, seconds),
        "ours": _reader(ours(augment_cfg), seconds),
        "ours_no_augment": _reader(ours(None), seconds),
        "ours_private_pool": _reader(ours(augment_cfg, pool=True), seconds),
    }
    rates = {n: [] for n in contenders}
    used = {n: [] for n in contenders}
    for order in round_orders(list(contenders), rounds):
        for name in order:
            rate, got = contenders[name]()
            rates[name].append(rate)
            used[name].append(got)
    return rates, used


def _epochs_timer(iterate_epoch, start: float) -> tuple[list[float], int]:
    """Runs ``max(EPOCHS)`` epochs; returns the elapsed seconds after each epoch
    in ``EPOCHS`` (counted from ``start``) and the images per epoch."""
    marks, per_epoch = [], 0
    for e in range(1, max(EPOCHS) + 1):
        per_epoch = iterate_epoch()
        if e in EPOCHS:
            marks.append(time.perf_counter() - start)
    return marks, per_epoch


def _timed_write(table, out: str, size: int, workers: int) -> float:
    """Seconds to write ``table`` as records into ``out`` with ``workers`` processes."""
    # The writer resumes finished shards of the same dataset: start empty, so
    # every call times a whole write.
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    write_records(
        table,
        out,
        shards=8,
        image_size=size,
        workers=workers,
        overwrite=True,
        seed=0,
    )
    return time.perf_counter() - start


def _ours_epochs(files, size: int, batch: int, steps: int):
    """Epochs of ``ours`` over the records, ``steps`` batches each (see
    :func:`_epochs_timer`)."""
    start = time.perf_counter()
    it = iter(
        load_dataset(
            files,
            image_size=size,
            batch_size=batch,
            training=True,
            augment=AugmentConfig(),
            seed=0,
        )
    )
    return _epochs_timer(
        lambda: sum(int(next(it)[0].shape[0]) for _ in range(steps)), start
    )


def _directory_epochs(keras, by_class: str, size: int, batch: int):
    """Epochs of ``image_dataset_from_directory`` over the original JPEGs (see
    :func:`_epochs_timer`)."""
    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(
        by_class,
        image_size=(size, size),
        batch_size=batch,
        shuffle=True,
        seed=0,
        verbose=False,
    )
    return _epochs_timer(lambda: sum(int(x.shape[0]) for x, _ in ds), start)


def _end_to_end(tf, keras, table, tmp, by_class, size, batch, cores, rounds):
    """Part 2: write once + E epochs of ours vs E epochs of the directory loader."""
    n = len(table)
    steps = -(-n // batch)  # ours: whole batches covering every image once
    records = os.path.join(tmp, "e2e_records")
    _timed_write(table, records, size, cores)
    files = list_files(records)
    scratch = os.path.join(tmp, "e2e_scratch")
    contenders = {
        "write": lambda: _timed_write(table, scratch, size, cores),
        "write_1_process": lambda: _timed_write(table, scratch, size, 1),
        "ours": lambda: _ours_epochs(files, size, batch, steps),
        "directory": lambda: _directory_epochs(keras, by_class, size, batch),
    }
    out: dict[str, list] = {name: [] for name in contenders}
    per_epoch = {}
    for order in round_orders(list(contenders), rounds):
        for name in order:
            got = contenders[name]()
            if isinstance(got, tuple):
                got, per_epoch[name] = got
            out[name].append(got)
    return _end_to_end_figures(out, per_epoch["ours"], n)


def _end_to_end_figures(out: dict, ours_per_epoch: int, n: int) -> dict:
    """Part 2's figures from each contender's rounds in ``out``."""
    result: dict = {
        "epochs": list(EPOCHS),
        "images_per_epoch": {"ours": ours_per_epoch, "directory": n},
        "write_seconds": spread(out["write"]),
        "write_1_process_seconds": spread(out["write_1_process"]),
        "writer_n_over_1": spread(ratios(out["write_1_process"], out["write"])),
    }
    for i, e in enumerate(EPOCHS):
        ours_total = [w + t[i] for w, t in zip(out["write"], out["ours"], strict=True)]
        dir_total = [t[i] for t in out["directory"]]
        result[f"epochs_{e}"] = {
            "ours_write_plus_read_seconds": spread(ours_total),
            "directory_seconds": spread(dir_total),
            "directory_over_ours": spread(ratios(dir_total, ours_total)),
        }
    # Steady per-epoch cost: epochs 2..10 (the first carries start-up costs).
    span = max(EPOCHS) - EPOCHS[0]
    o = round(statistics.median((t[-1] - t[0]) / span for t in out["ours"]), 4)
    d = round(statistics.median((t[-1] - t[0]) / span for t in out["directory"]), 4)
    w = result["write_seconds"]["median"]
    result["seconds_per_epoch"] = {"ours": o, "directory": d}
    # The epoch count from which write once + read beats the directory loader,
    # from the figures above (None: ours reads no faster, it never pays off).
    result["break_even_epochs"] = round(w / (d - o), 2) if d > o else None
    return result


def run(args) -> dict:
    """Runs the input benchmark; returns the figures as a dict."""
    import keras
    import tensorflow as tf

    quick = bool(getattr(args, "quick", False))
    n_make, side, size, batch = QUICK if quick else FULL
    rounds = max(1, int(getattr(args, "rounds", None) or (2 if quick else 5)))
    seconds = float(getattr(args, "seconds", None) or (0.2 if quick else 10.0))
    cores = machine()["cores"]
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        images = getattr(args, "images", None) or make_images(
            os.path.join(tmp, "img"), n=n_make, side=side
        )
        by_class = os.path.join(tmp, "by_class")
        table = _class_layout(images, by_class)
        records = os.path.join(tmp, "records")
        manifest = write_records(
            table, records, shards=8, image_size=size, workers=cores, seed=0
        )
        files = list_files(records)
        record_bytes = int(sum(map(os.path.getsize, files)) / manifest["total"])
        rates, used = _decode_limit(
            tf, files, size, batch, cores, seconds, rounds, AugmentConfig()
        )
        e2e = _end_to_end(tf, keras, table, tmp, by_class, size, batch, cores, rounds)

    limit = [cores * r for r in rates["single_thread"]]
    per_cpu = {n: ratios(rates[n], used[n]) for n in rates}
    of_limit = {
        f"{n}_over_cores_x_single_thread": spread(ratios(rates[n], limit))
        for n in ("ours", "ours_no_augment", "ours_private_pool", "parallel_decode")
    }
    work = {  # images per CPU-second, relative to the single-thread decode
        n: spread(ratios(per_cpu[n], per_cpu["single_thread"]))
        for n in rates
        if n != "single_thread"
    }
    goal = of_limit["ours_over_cores_x_single_thread"]["median"]
    return {
        "bench": "input",
        "images": len(table),
        "records": manifest["total"],
        "image_size": size,
        "record_bytes_mean": record_bytes,
        "batch_size": batch,
        "cores": cores,
        "rounds": rounds,
        "seconds_per_contender": seconds,
        "decode_limit": {
            "images_per_sec": {n: spread(v, 1) for n, v in rates.items()},
            "cores_used": {n: spread(v, 2) for n, v in used.items()},
            "per_cpu_second_over_single_thread": work,
            **of_limit,
        },
        "ours_over_cores_x_single_thread_median": goal,
        "target": ">= 0.85",
        "meets_target": bool(goal >= 0.85),
        "end_to_end": e2e,
        "break_even_epochs": e2e["break_even_epochs"],
    }
