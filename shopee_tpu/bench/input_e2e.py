"""Part 2 of ``bench input``: writing the records once plus E epochs of our pipeline,
against E epochs of ``keras.utils.image_dataset_from_directory`` over the original
JPEGs; the record writer with 1 and with ``cores`` processes; and what the writer
spends per image.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import statistics
import time

import numpy as np

from shopee_tpu.bench import ratios, round_orders, spread
from shopee_tpu.config import AugmentConfig
from shopee_tpu.data.read.files import list_files
from shopee_tpu.data.read.pipeline import load_dataset
from shopee_tpu.data.tfrecord import crc32c, encode_example
from shopee_tpu.data.write.images import resized_image
from shopee_tpu.data.write.records import write_records

EPOCHS = (1, 3, 10)

__all__ = ["EPOCHS", "end_to_end", "writer_steps"]


def _cpu(who) -> float:
    me = resource.getrusage(who)
    return me.ru_utime + me.ru_stime


def _epochs_timer(iterate_epoch, start: float) -> tuple[dict, int]:
    """Runs ``max(EPOCHS)`` epochs; returns the elapsed wall seconds (counted
    from ``start``) and this process's CPU seconds after each epoch in ``EPOCHS``,
    and the images per epoch."""
    marks: dict[str, list[float]] = {"wall": [], "cpu": []}
    cpu, per_epoch = _cpu(resource.RUSAGE_SELF), 0
    for e in range(1, max(EPOCHS) + 1):
        per_epoch = iterate_epoch()
        if e in EPOCHS:
            marks["wall"].append(time.perf_counter() - start)
            marks["cpu"].append(_cpu(resource.RUSAGE_SELF) - cpu)
    return marks, per_epoch


def _timed_write(table, out: str, size: int, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds to write ``table`` as records into ``out`` with
    ``workers`` processes (1: in this process); CPU counts every process."""
    # The writer resumes finished shards of the same dataset: start empty, so
    # every call times a whole write.
    shutil.rmtree(out, ignore_errors=True)
    cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    write_records(
        table, out, shards=8, image_size=size, workers=workers, seed=0, verbose=False
    )
    wall = time.perf_counter() - start
    return wall, _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - cpu


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


def end_to_end(keras, table, tmp, by_class, size, batch, cores, rounds) -> dict:
    """Write once + E epochs of ours vs E epochs of the directory loader, and the
    writer with 1 and ``cores`` processes, alternating over ``rounds``."""
    n = len(table)
    steps = n // batch  # the corpus is whole batches: both sides read n images
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
            if name in ("ours", "directory"):
                got, per_epoch[name] = got
            out[name].append(got)
    return _end_to_end_figures(out, per_epoch, n)


def _writer_figures(out: dict, n: int) -> dict:
    """The writer with ``cores`` and with 1 process: seconds, CPU per image, the
    cores kept busy, and 2/1 split into those two factors."""
    wall = {k: [w for w, _ in out[k]] for k in ("write", "write_1_process")}
    cpu = {k: [c for _, c in out[k]] for k in ("write", "write_1_process")}
    busy = {k: ratios(cpu[k], wall[k]) for k in wall}
    return {
        "write_seconds": spread(wall["write"]),
        "write_1_process_seconds": spread(wall["write_1_process"]),
        "writer_n_over_1": spread(ratios(wall["write_1_process"], wall["write"])),
        "writer_cpu_ms_per_image": {
            k: spread([c * 1000 / n for c in v], 2) for k, v in cpu.items()
        },
        "writer_busy_cores": {k: spread(v, 2) for k, v in busy.items()},
    }


def _steady(rounds: list[dict], key: str) -> float:
    """Median cost of one epoch over epochs 2..10 (the first carries start-up)."""
    span = max(EPOCHS) - EPOCHS[0]
    return statistics.median((m[key][-1] - m[key][0]) / span for m in rounds)


def _end_to_end_figures(out: dict, per_epoch: dict, n: int) -> dict:
    """Part 2's figures from each contender's rounds in ``out``."""
    result: dict = {
        "epochs": list(EPOCHS),
        "images_per_epoch": {"ours": per_epoch["ours"], "directory": n},
        **_writer_figures(out, n),
    }
    write = [w for w, _ in out["write"]]
    for i, e in enumerate(EPOCHS):
        ours_total = [w + m["wall"][i] for w, m in zip(write, out["ours"], strict=True)]
        dir_total = [m["wall"][i] for m in out["directory"]]
        result[f"epochs_{e}"] = {
            "ours_write_plus_read_seconds": spread(ours_total),
            "directory_seconds": spread(dir_total),
            "directory_over_ours": spread(ratios(dir_total, ours_total)),
        }
    o, d = (round(_steady(out[k], "wall"), 4) for k in ("ours", "directory"))
    w = result["write_seconds"]["median"]
    result["seconds_per_epoch"] = {"ours": o, "directory": d}
    # The epoch count from which write once + read beats the directory loader,
    # from the figures above (None: ours reads no faster, it never pays off).
    result["break_even_epochs"] = round(w / (d - o), 2) if d > o else None
    # The same in CPU seconds, which other processes on the machine disturb less.
    o, d = (round(_steady(out[k], "cpu"), 4) for k in ("ours", "directory"))
    w = round(statistics.median(c for _, c in out["write"]), 4)
    result["cpu_seconds_per_epoch"] = {"ours": o, "directory": d}
    result["write_cpu_seconds"] = w
    result["break_even_epochs_cpu"] = round(w / (d - o), 2) if d > o else None
    return result


def _ms(fn, items) -> tuple[float, list]:
    """CPU milliseconds per item of ``fn`` over ``items``, and the results."""
    start = time.process_time()
    got = [fn(x) for x in items]
    return (time.process_time() - start) * 1000 / len(items), got


def _entropy_decode(data: bytes) -> None:
    """Decodes at 1/8 scale: a JPEG's entropy decoding, which any reader pays in
    full, with almost none of the inverse DCT and colour work."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    img.load()


def _directory_ms(tf, datas: list[bytes], size: int) -> float:
    """CPU ms per image of what ``image_dataset_from_directory`` does to each file
    (decode at full size, bilinear resize to float32), on one tf.data thread."""

    def load(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size))

    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.autotune.enabled = False
    ds = tf.data.Dataset.from_tensor_slices(datas).map(load).with_options(opts)
    start = time.process_time()
    for _ in ds:
        pass
    return (time.process_time() - start) * 1000 / len(datas)


def writer_steps(tf, paths: list[str], size: int) -> dict:
    """What the writer spends per image, on one core: decoding at a reduced DCT
    scale and resizing (``draft``) or at full size (``full``), JPEG encoding, the
    MD5 of the original and the record (example + CRCs); the entropy decoding
    alone (the floor of any JPEG reader) and what the directory loader spends per
    image; and the mean absolute pixel error (0..255) of the draft path against
    the full decode."""
    datas = []
    for path in paths:
        with open(path, "rb") as f:
            datas.append(f.read())
    ms: dict[str, float] = {}
    ms["draft_decode_resize"], drafted = _ms(lambda d: resized_image(d, size), datas)
    ms["full_decode_resize"], full = _ms(
        lambda d: resized_image(d, size, draft=False), datas
    )

    def encode(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    ms["encode"], encoded = _ms(encode, drafted)
    ms["md5"], digests = _ms(lambda d: hashlib.md5(d).hexdigest(), datas)

    def record(pair) -> int:
        example = encode_example({"image": pair[0], "label": 0, "md5": pair[1]})
        return crc32c(example) ^ crc32c(len(example).to_bytes(8, "little"))

    ms["record"], _ = _ms(record, list(zip(encoded, digests, strict=True)))
    ms["entropy_decode"], _ = _ms(_entropy_decode, datas)
    ms["directory_decode_resize"] = _directory_ms(tf, datas, size)
    errors = [
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
        for a, b in zip(drafted, full, strict=True)
    ]
    ours = ms["draft_decode_resize"] + ms["encode"] + ms["md5"] + ms["record"]
    return {
        "images": len(paths),
        "cpu_ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "writer_cpu_ms_per_image": round(ours, 3),
        "draft_over_full_decode_resize": round(
            ms["draft_decode_resize"] / ms["full_decode_resize"], 3
        ),
        "draft_mean_abs_pixel_error": {
            "mean": round(float(np.mean(errors)), 3),
            "max": round(max(errors), 3),
        },
    }
