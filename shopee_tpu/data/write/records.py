"""Writing TFRecord shards and their ``manifest.json``, in parallel and resumably.

Shards are stratified by class and each group (product) stays in one shard, so
holding out whole shards is a seeded, stratified split by group. Every shard is
written by one process to a temporary name and renamed when complete; the manifest
is rewritten atomically after each shard, so a rerun of the same command skips the
finished shards. A rerun with other settings or other data is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

from shopee_tpu import fs
from shopee_tpu.console import progress_bar
from shopee_tpu.data import manifests
from shopee_tpu.data.splits import stratified_group_kfold
from shopee_tpu.data.write import sources
from shopee_tpu.data.write.images import RESIZE_MODES
from shopee_tpu.data.write.shard_writer import ShardParams, ShardWriter, write_shard
from shopee_tpu.data.write.writer_pool import WorkerPool

__all__ = [
    "shard_params",
    "write_records",
    "write_records_from_csv",
    "write_rows",
    "writer_processes",
]


def write_records_from_csv(
    csv: str | os.PathLike,
    images: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    test: bool = False,
    shards: int = 16,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
    workers: int | None = None,
    label_map: Mapping | str | os.PathLike | None = None,
    overwrite: bool = False,
    seed: int = 42,
    prefix: str | None = None,
    verbose: bool = True,
) -> dict:
    """Writes records from a CSV: the Shopee layout or any ``path,label[,group]`` table.

    Images are looked up relative to ``images`` and, failing that, by file name
    anywhere below it (Shopee's ``train/train/train/NN/<md5>.jpg``). A labeled row
    with an empty category takes its folder's name. With ``test=True`` the CSV's
    category column (a placeholder in Shopee's test.csv) is ignored. See
    :func:`write_records` for the other arguments and the manifest returned.
    """
    csv = os.fspath(csv)
    table = sources.normalise_table(sources.read_table(csv), test=test, where=csv)
    table = sources.resolve_paths(table, images)
    if not test:
        table = sources.fill_labels_from_folders(table)
    return write_records(
        table,
        out_dir,
        shards=shards,
        image_size=image_size,
        resize=resize,
        quality=quality,
        workers=workers,
        test=test,
        label_map=label_map,
        overwrite=overwrite,
        seed=seed,
        prefix=prefix,
        verbose=verbose,
        _where=csv,
    )


def write_records(
    source,
    out_dir: str | os.PathLike,
    *,
    shards: int = 16,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
    workers: int | None = None,
    test: bool = False,
    label_map: Mapping | str | os.PathLike | None = None,
    overwrite: bool = False,
    seed: int = 42,
    prefix: str | None = None,
    verbose: bool = True,
    _where: str = "DataFrame",
) -> dict:
    """Writes images into stratified TFRecord shards plus ``manifest.json``.

    Args:
        source: A DataFrame with ``path`` and ``label`` columns (``label`` may be
            absent when ``test``), optionally ``id`` and ``group``; or an iterable
            of ``(jpeg_bytes, label, id, group)`` tuples, streamed (shards are then
            balanced per class greedily as items arrive; groups should arrive
            together, as a BSON product's images do).
        out_dir: Local folder for ``<prefix>-NN-<count>.tfrec`` and the manifest.
        shards: Number of shards (fewer when there are fewer groups).
        image_size: Resize on write (training size keeps the reader fast);
            ``None`` keeps the original images.
        resize: ``"square"`` or ``"longest"`` (see ``images.prepare_image``).
        quality: JPEG quality of re-encoded images.
        workers: Writer processes; default: the CPU count. 1 writes in-process.
        test: Unlabeled records (label -1); ids keep each image's name.
        label_map: ``{category: class_id}``, a JSON file or a manifest to reuse
            (e.g. the training set's for a validation set). Default: sorted labels.
        overwrite: Replace records of a different dataset or settings in ``out_dir``.
        seed: Seed of the shard assignment.
        prefix: File name prefix; default ``train`` or ``test``.
        verbose: Show a progress bar (images/s and the time left, over all
            writer processes).

    Returns:
        The manifest (see :func:`read_manifest`).

    Raises:
        ValueError: No usable image, labels outside ``label_map``, or ``out_dir``
            holding another dataset while ``overwrite`` is false.
    """
    out_dir = os.fspath(out_dir)
    params = _params(out_dir, shards, image_size, resize, quality, test, seed, prefix)
    workers = writer_processes(workers)
    label_map = sources.load_label_map(label_map)
    return _write_source(
        source, out_dir, params, label_map, workers, overwrite, verbose, _where
    )


def _params(out_dir, shards, image_size, resize, quality, test, seed, prefix) -> dict:
    """The settings the manifest records, once checked."""
    if fs.is_remote(out_dir):
        raise ValueError(f"write records locally, then upload them: {out_dir}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return {
        "prefix": prefix or ("test" if test else "train"),
        "test": bool(test),
        "image_size": image_size,
        "resize": resize,
        "quality": int(quality),
        "seed": int(seed),
        "num_shards": int(shards),
    }


def _write_source(
    source, out_dir, params, label_map, workers, overwrite, verbose, where
):
    """Writes a table (a DataFrame or a CSV path) or a stream of items, under a
    progress bar."""
    import pandas as pd

    if isinstance(source, str | os.PathLike):  # a CSV path
        where = os.fspath(source)
        source = sources.read_table(source)
    total = len(source) if hasattr(source, "__len__") else None
    with progress_bar(
        total, f"records {params['prefix']}", unit="img", disable=not verbose
    ) as bar:
        if isinstance(source, pd.DataFrame):
            return _write_table(
                source, out_dir, params, label_map, workers, overwrite, where, bar
            )
        return _write_stream(
            iter(source), out_dir, params, label_map, workers, overwrite, bar
        )


def writer_processes(workers: int | None) -> int:
    """``workers`` writer processes (at least one), or with 0 or ``None`` one per
    CPU this process may run on (its affinity set, not the machine's)."""
    return max(1, workers or _usable_cpus())


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Table sources: the plan is known up front, each process writes whole shards.


def _write_table(
    table, out_dir, params, label_map, workers, overwrite, where, bar
) -> dict:
    test = params["test"]
    table = sources.normalise_table(table, test=test, where=where)
    table = sources.resolve_paths(table, None)  # relative paths: from the cwd
    if len(table) == 0:
        raise ValueError(f"{where}: no rows, so no usable images")
    if test:
        label_map = label_map or {}
        ids = [-1] * len(table)
    else:
        if label_map is None:
            label_map = sources.build_label_map(table["label"])
        sources.check_labels(table["label"], label_map, where)
        ids = [label_map[v] for v in table["label"]]
    rows = list(zip(table["path"], ids, table["id"], table["group"], strict=True))
    return _write_rows(rows, out_dir, params, label_map, workers, overwrite, bar)


def write_rows(
    rows: list[tuple],
    out_dir: str | os.PathLike,
    *,
    label_map: Mapping[str, int],
    test: bool,
    shards: int = 16,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
    workers: int | None = None,
    overwrite: bool = False,
    seed: int = 42,
    prefix: str | None = None,
    verbose: bool = True,
    content: str | None = None,
) -> dict:
    """Writes rows whose class ids are known: the step every source but a stream
    shares (files named in a CSV or found in class folders, arrays, pixel CSVs and
    idx files). Shards are planned up front, and a rerun resumes.

    Args:
        rows: ``(source, class_id, id, group)`` per image; ``source`` is what
            ``shard_writer.write_shard`` reads: a file path, ``Pixels`` or
            ``Unusable`` (a row recorded as skipped with its reason). Class ids
            are ``-1`` when ``test``.
        label_map: ``{category: class_id}`` the class ids come from.
        content: A digest of the images themselves, for sources whose ids do not
            tell one dataset from another (arrays): it joins the fingerprint.

    See :func:`write_records` for the other arguments and the manifest returned.
    """
    out_dir = os.fspath(out_dir)
    params = _params(out_dir, shards, image_size, resize, quality, test, seed, prefix)
    workers = writer_processes(workers)
    label_map = dict(label_map)
    with progress_bar(
        len(rows), f"records {params['prefix']}", unit="img", disable=not verbose
    ) as bar:
        return _write_rows(
            rows, out_dir, params, label_map, workers, overwrite, bar, content
        )


def _write_rows(
    rows, out_dir, params, label_map, workers, overwrite, bar, content=None
) -> dict:
    """Plans the shards of ``rows`` and writes those not finished yet."""
    # The writer processes start (Python, numpy and Pillow: a fraction of a
    # second each) while this process plans the shards.
    n_procs = min(workers, params["num_shards"])
    with WorkerPool(n_procs if n_procs > 1 else 0) as pool:
        manifest, tasks = _plan_rows(
            rows, out_dir, params, label_map, overwrite, content
        )
        # Finished shards of an earlier run count as done.
        bar.total = len(rows)
        bar.update(len(rows) - sum(len(t[2]) for t in tasks))
        if not pool.procs or len(tasks) <= 1:
            for task in tasks:
                manifests.record(out_dir, manifest, write_shard(task, bar.update))
        else:
            for result in pool.map_unordered(
                _largest_first(tasks), progress=bar.update
            ):
                manifests.record(out_dir, manifest, result)
    return manifests.finish(out_dir, manifest)


def _plan_rows(rows, out_dir, params, label_map, overwrite, content):
    """Assigns rows to shards; returns the manifest and the shard tasks still to
    write."""
    test = params["test"]
    groups = [g or f"\0row{i}" for i, (*_, g) in enumerate(rows)]
    n_shards = min(params["num_shards"], len(set(groups)))
    strata = [0] * len(rows) if test else [r[1] for r in rows]
    fold = stratified_group_kfold(strata, groups, n_shards, params["seed"])
    plan = [(r[1], r[2], r[3], int(f)) for r, f in zip(rows, fold)]
    if content is not None:
        plan.append(content)
    fingerprint = manifests.fingerprint(params, label_map, plan)
    manifest = manifests.start(
        out_dir, params, label_map, fingerprint, n_shards, overwrite
    )
    sp = shard_params(out_dir, params, n_shards)
    tasks = [
        (sp, s, [r for r, f in zip(rows, fold) if f == s])
        for s in range(n_shards)
        if str(s) not in manifest["done"]
    ]
    return manifest, tasks


def _largest_first(tasks: list) -> list:
    """Shard tasks by the bytes of their files, largest first: the next free
    process takes the largest shard left, so the last to finish is a small one
    (bytes are a rough proxy for decoding time)."""

    def size(path) -> int:
        if not isinstance(path, str | os.PathLike):  # pixels in memory
            return 0
        try:
            return os.path.getsize(path)
        except OSError:  # the writer reports the missing or unreadable file
            return 0

    return sorted(tasks, key=lambda t: -sum(size(row[0]) for row in t[2]))


# ---------------------------------------------------------------------------
# Iterable sources: streamed; shard owners are processes fed through queues.


def _write_stream(items: Iterable, out_dir, params, label_map, workers, overwrite, bar):
    test = params["test"]
    n_shards = params["num_shards"]
    fingerprint = manifests.fingerprint(params, label_map, None)
    manifest = manifests.start(
        out_dir, params, label_map or {}, fingerprint, n_shards, overwrite
    )
    done = {int(k) for k in manifest["done"]}
    sp = shard_params(out_dir, params, n_shards)
    assign = _OnlineAssigner(n_shards, params["seed"])
    labels_seen: dict[str, int] = dict(label_map or {})
    local: dict[int, ShardWriter] = {}
    with WorkerPool(workers if workers > 1 else 0, sp) as pool:
        for data, label, id_, group in items:
            bar.update()
            class_id = -1 if test else _class_id(label, label_map, labels_seen)
            shard = assign(str(group) or f"\0{id_}", class_id)
            if shard in done:
                continue
            item = (shard, data, class_id, str(id_), str(group))
            if workers > 1:
                pool.put(shard % workers, item)
            else:
                if shard not in local:
                    local[shard] = ShardWriter(sp, shard)
                local[shard].add(*item[1:], item[3])
        if label_map is None and not test:
            manifest["label_map"] = labels_seen
            manifest["num_classes"] = len(labels_seen)
        results = pool.finish() + [local[s].finish() for s in sorted(local)]
    for result in results:
        manifests.record(out_dir, manifest, result)
    for s in range(n_shards):
        manifest["done"].setdefault(str(s), manifests.empty_result(s))
    return manifests.finish(out_dir, manifest)


def _class_id(label, label_map, seen: dict[str, int]) -> int:
    key = str(label)
    if label_map is not None:
        if key not in label_map:
            raise ValueError(f"label {key!r} is not in the label map")
        return label_map[key]
    if isinstance(label, int) or key.lstrip("-").isdigit():
        seen.setdefault(key, int(key))
        return int(key)
    raise ValueError(
        f"label {key!r} is a string: a streamed source needs label_map "
        "(class ids must be fixed before the first record is written)"
    )


class _OnlineAssigner:
    """Puts each new group in the shard with the fewest images of its class."""

    def __init__(self, n_shards: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.n = n_shards
        self.group_shard: dict[str, int] = {}
        self.by_class: dict[int, list[int]] = {}
        self.total = [0] * n_shards

    def __call__(self, group: str, class_id: int) -> int:
        shard = self.group_shard.get(group)
        counts = self.by_class.setdefault(class_id, [0] * self.n)
        if shard is None:
            jitter = self.rng.random(self.n)
            shard = min(
                range(self.n), key=lambda s: (counts[s], self.total[s], jitter[s])
            )
            self.group_shard[group] = shard
        counts[shard] += 1
        self.total[shard] += 1
        return shard


# ---------------------------------------------------------------------------
# Manifest bookkeeping shared by both paths.


def shard_params(out_dir: str, params: dict, n_shards: int) -> ShardParams:
    """What every writer process needs to name and fill the shards of ``out_dir``."""
    return ShardParams(
        out_dir=out_dir,
        prefix=params["prefix"],
        width=max(2, len(str(n_shards - 1))),
        image_size=params["image_size"],
        resize=params["resize"],
        quality=params["quality"],
    )
