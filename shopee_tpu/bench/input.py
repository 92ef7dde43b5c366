"""``shopee-tpu bench input``: our TFRecord pipeline against the decode limit of the
same records, and end to end against ``keras.utils.image_dataset_from_directory``
on the same original JPEGs.

**1. Decode limit** (the same records, stored at the training size). Contenders,
each for ``--seconds`` per round, the order reversed every other round:

- ``single_thread``: parse + JPEG decode per record, then batch, on one thread, as
  uint8 (what every pipeline yields): the limit per core, the reference;
- ``parallel_decode``: the same under tf.data's parallel ``map`` on all cores;
- ``ours``: ``load_dataset(training=True)`` with the default augmentation (flip);
- ``ours_no_augment``: the same without augmentation;
- ``ours_private_pool``: ``ours`` on a private thread pool sized to the cores;
- on one thread, each adding one stage: ``read`` (the records' bytes), ``parse``
  (+ parsing), ``single_thread`` (+ decode), ``decode_flip`` (+ the flip),
  ``ours_one_thread`` (all of ``ours``: interleaved reads, shuffle, per-batch
  step, prefetch).

Each is reported as a fraction of ``cores x single_thread`` (goal for ``ours``:
>= 0.92), with the cores it kept busy (CPU seconds / wall seconds) and its CPU
microseconds per image. ``ours``' fraction is the product of two factors, both
reported: ``work`` (the single thread's CPU per image over ours') and ``cores``
(the cores ours kept busy over ``cores x`` the single thread's). The voluntary
context switches per image count the hand-offs between threads. The CPU per image
of the one-thread stages, differenced, is the breakdown: ``read``, ``parse``,
``decode``, ``flip``, ``pipeline`` (ours on one thread over the decode and flip)
and ``threads`` (ours on all cores over ours on one: hand-offs between threads).

**2. End to end** (``input_e2e``): writing the records once (``cores`` processes)
+ E epochs of ``ours``, against E epochs of ``image_dataset_from_directory``
(decode + resize of the originals), E = 1, 3, 10, the same images per epoch on
each side, and the break-even epoch count, in wall seconds and in CPU seconds
(which other processes disturb less); the writer with 1 process
(``writer_n_over_1``, split into CPU per image and busy cores). ``writer_steps``:
the writer's CPU per image by step on a sample of the images (one core), the mean
pixel error of decoding at a reduced DCT scale against a full decode, and the
break-even a writer would reach if it cost only the entropy decoding of each
JPEG, which any reader of the file pays in full.

Without ``--images``, 1,920 JPEGs (30 batches) of about 500 px are made from
scikit-learn's two sample photos. With ``--images DIR``, every JPEG below DIR
(``--min-side``: those whose shorter side has that many px), a seeded subset of
whole batches; the first folder below DIR is the class (``input_corpus``).
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time

import numpy as np

from shopee_tpu.bench import machine, ratios, round_orders, spread, timed_rate
from shopee_tpu.bench.input_corpus import (
    class_layout,
    corpus_facts,
    find_jpegs,
    make_images,
)
from shopee_tpu.bench.input_e2e import end_to_end, writer_steps
from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.augment import flip_by_bits
from shopee_tpu.data.read.decode import decode_image
from shopee_tpu.data.read.files import list_files
from shopee_tpu.data.read.pipeline import load_dataset
from shopee_tpu.data.write.records import write_records

# (images made, their side, training size, batch): full and --quick settings.
FULL = (1920, 500, 224, 64)
QUICK = (64, 96, 32, 16)
GOAL = 0.92  # ours / (cores x single_thread)
PARALLEL = ("parallel_decode", "ours", "ours_no_augment", "ours_private_pool")
STAGES = ("read", "parse", "single_thread", "decode_flip", "ours_one_thread")


def _usage() -> tuple[float, int]:
    """CPU seconds of this process and its voluntary context switches (a thread
    waiting for another: the hand-offs between pipeline stages)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime, me.ru_nvcsw


def _reader(make_ds, batch: int, seconds: float, warmup: int = 2):
    """A contender: builds the dataset (whole batches of ``batch``), skips
    ``warmup`` batches (buffers fill, threads start), then reads for ``seconds``;
    returns (images/s, cores busy, voluntary context switches per image)."""

    def go():
        it = iter(make_ds())
        for _ in range(warmup):
            next(it)
        wall, (cpu, switches) = time.perf_counter(), _usage()
        rate = timed_rate(lambda: (next(it), batch)[1], seconds)
        wall = time.perf_counter() - wall
        cpu_end, switches_end = _usage()
        return rate, (cpu_end - cpu) / wall, (switches_end - switches) / (rate * wall)

    return go


def _contenders(tf, files, size, batch, cores, augment_cfg) -> dict:
    """The decode-limit contenders: name -> a function making its dataset."""
    plain = tf.autograph.experimental.do_not_convert
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        return tf.io.parse_single_example(record, features)

    def parse_decode(record):
        ex = parse(record)
        # Records are stored at the training size: decode only, as ours does.
        return decode_image(ex["image"], size, exact=True), ex["label"]

    def decode_flip(draw, record):
        image, label = parse_decode(record)
        return flip_by_bits(image, augment_cfg, draw), label

    def one_thread(ds):
        opts = tf.data.Options()
        opts.threading.private_threadpool_size = 1
        opts.threading.max_intra_op_parallelism = 1
        opts.autotune.enabled = False
        return ds.with_options(opts)

    def records():
        return tf.data.TFRecordDataset(files).repeat()

    def parallel():
        par = dict(num_parallel_calls=cores, deterministic=False)
        ds = records().map(plain(parse_decode), **par)
        return ds.batch(batch).prefetch(2)

    def ours(augment, threads: int | None = None):
        ds = load_dataset(
            files,
            image_size=size,
            batch_size=batch,
            training=True,
            augment=augment,
            seed=0,
        )
        if threads == 1:
            return one_thread(ds)
        if threads:
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = threads
            opts.threading.max_intra_op_parallelism = 1
            ds = ds.with_options(opts)
        return ds

    draws = tf.data.Dataset.random(seed=0)
    return {
        "read": lambda: one_thread(records().batch(batch)),
        "parse": lambda: one_thread(records().map(plain(parse)).batch(batch)),
        "single_thread": lambda: one_thread(
            records().map(plain(parse_decode)).batch(batch)
        ),
        "decode_flip": lambda: one_thread(
            tf.data.Dataset.zip(draws, records()).map(plain(decode_flip)).batch(batch)
        ),
        "ours_one_thread": lambda: ours(augment_cfg, threads=1),
        "parallel_decode": parallel,
        "ours": lambda: ours(augment_cfg),
        "ours_no_augment": lambda: ours(None),
        "ours_private_pool": lambda: ours(augment_cfg, threads=cores),
    }


def _decode_limit(tf, files, size, batch, cores, seconds, rounds):
    """Part 1: the contenders over the same records; returns rates and cores."""
    makers = _contenders(tf, files, size, batch, cores, AugmentConfig())
    contenders = {n: _reader(m, batch, seconds) for n, m in makers.items()}
    rates = {n: [] for n in contenders}
    used = {n: [] for n in contenders}
    switches = {n: [] for n in contenders}
    for order in round_orders(list(contenders), rounds):
        for name in order:
            rate, got, waits = contenders[name]()
            rates[name].append(rate)
            used[name].append(got)
            switches[name].append(waits)
    return rates, used, switches


def _limit_figures(rates: dict, used: dict, switches: dict, cores: int) -> dict:
    """Part 1's figures: fractions of the limit, CPU per image, the breakdown."""
    limit = [cores * r for r in rates["single_thread"]]
    cpu_us = {n: [1e6 * u / r for r, u in zip(rates[n], used[n])] for n in rates}
    work = {  # images per CPU-second, relative to the single-thread decode
        n: spread(ratios(cpu_us["single_thread"], cpu_us[n])) for n in PARALLEL
    }
    busy = ratios(used["ours"], [cores * u for u in used["single_thread"]])
    median = {n: statistics.median(v) for n, v in cpu_us.items()}
    chain = ["read", "parse", "single_thread", "decode_flip", "ours_one_thread", "ours"]
    names = ["read", "parse", "decode", "flip", "pipeline", "threads"]
    steps = [median[chain[0]]] + [
        median[b] - median[a] for a, b in zip(chain, chain[1:])
    ]
    return {
        "images_per_sec": {n: spread(v, 1) for n, v in rates.items()},
        "cores_used": {n: spread(v, 2) for n, v in used.items()},
        "cpu_us_per_image": {n: spread(v, 1) for n, v in cpu_us.items()},
        "context_switches_per_image": {n: spread(v, 2) for n, v in switches.items()},
        **{
            f"{n}_over_cores_x_single_thread": spread(ratios(rates[n], limit))
            for n in PARALLEL
        },
        "per_cpu_second_over_single_thread": work,
        "ours_factors": {"work": work["ours"], "cores": spread(busy)},
        "breakdown_cpu_us_per_image": {
            n: round(v, 1) for n, v in zip(names, steps, strict=True)
        },
    }


def _corpus(args, tmp: str, batch: int, quick: bool):
    """The (path, label) rows to use, a seeded subset of whole batches, and what
    the folder held."""
    images = getattr(args, "images", None)
    n_make, side = (QUICK if quick else FULL)[:2]
    min_side = int(getattr(args, "min_side", 0) or 0)
    if images is None:
        images = make_images(os.path.join(tmp, "img"), n=n_make, side=side)
    rows, small = find_jpegs(images, min_side)
    if len(rows) < batch:
        raise ValueError(
            f"--images {images}: {len(rows)} JPEGs, fewer than one batch ({batch})"
        )
    keep = np.sort(
        np.random.default_rng(0).choice(len(rows), len(rows) // batch * batch, False)
    )
    found = {"found": len(rows) + small, "smaller_than_min_side": small}
    return [rows[i] for i in keep], found


def _goals(result: dict, synthetic: bool) -> dict:
    """Each goal of the issue that applies to this corpus, with its figure."""
    e2e = result["end_to_end"]
    goals = {
        "ours_over_cores_x_single_thread": (
            result["ours_over_cores_x_single_thread_median"],
            ">=",
            GOAL,
        ),
        "writer_n_over_1": (e2e["writer_n_over_1"]["median"], ">=", 1.8),
    }
    be = e2e["break_even_epochs"]
    if synthetic:
        goals["break_even_epochs"] = (be, "<=", 2.0)
    elif result["corpus"]["shorter_side_px"][0] >= 1000:
        goals["break_even_epochs"] = (be, "<=", 0.4)
        at_10 = e2e["epochs_10"]["directory_over_ours"]["median"]
        goals["directory_over_ours_at_10_epochs"] = (at_10, ">=", 12.0)
    return {
        name: {
            "value": value,
            "goal": f"{op} {target}",
            "met": value is not None
            and (value >= target if op == ">=" else value <= target),
        }
        for name, (value, op, target) in goals.items()
    }


def run(args) -> dict:
    """Runs the input benchmark; returns the figures as a dict."""
    import keras
    import tensorflow as tf

    quick = bool(getattr(args, "quick", False))
    _, _, size, batch = QUICK if quick else FULL
    rounds = max(1, int(getattr(args, "rounds", None) or (2 if quick else 5)))
    seconds = float(getattr(args, "seconds", None) or (0.2 if quick else 10.0))
    cores = machine()["cores"]
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        rows, found = _corpus(args, tmp, batch, quick)
        by_class = os.path.join(tmp, "by_class")
        table = class_layout(rows, by_class)
        records = os.path.join(tmp, "records")
        manifest = write_records(
            table, records, shards=8, image_size=size, verbose=False, seed=0
        )
        files = list_files(records)
        record_bytes = int(sum(map(os.path.getsize, files)) / manifest["total"])
        rates, used, switches = _decode_limit(
            tf, files, size, batch, cores, seconds, rounds
        )
        e2e = end_to_end(keras, table, tmp, by_class, size, batch, cores, rounds)
        sample = np.random.default_rng(1).permutation(len(rows))[: 8 if quick else 64]
        steps = writer_steps(tf, [rows[i][0] for i in sorted(sample)], size)
        facts = corpus_facts(rows)

    limit = _limit_figures(rates, used, switches, cores)
    # The break-even if writing cost no more than entropy-decoding every image,
    # which any JPEG reader pays: the floor for a writer that decodes them.
    saved = (
        e2e["cpu_seconds_per_epoch"]["directory"] - e2e["cpu_seconds_per_epoch"]["ours"]
    )
    floor = steps["cpu_ms_per_image"]["entropy_decode"] * len(rows) / 1000
    steps["break_even_epochs_floor_cpu"] = (
        round(floor / saved, 2) if saved > 0 else None
    )
    goal = limit["ours_over_cores_x_single_thread"]["median"]
    result = {
        "bench": "input",
        "corpus": {
            "folder": getattr(args, "images", None) or "synthetic",
            "min_side": int(getattr(args, "min_side", 0) or 0),
            **found,
            "used": len(rows),
            **facts,
        },
        "images": len(table),
        "records": manifest["total"],
        "image_size": size,
        "record_bytes_mean": record_bytes,
        "batch_size": batch,
        "cores": cores,
        "rounds": rounds,
        "seconds_per_contender": seconds,
        "decode_limit": limit,
        "ours_over_cores_x_single_thread_median": goal,
        "target": f">= {GOAL}",
        "meets_target": bool(goal >= GOAL),
        "end_to_end": e2e,
        "break_even_epochs": e2e["break_even_epochs"],
        "writer_steps": steps,
    }
    result["goals"] = _goals(result, synthetic=getattr(args, "images", None) is None)
    return result
