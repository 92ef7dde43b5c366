"""TFRecords to batches: ``train_dataset`` for training, ``eval_dataset`` for
validation and prediction (``load_dataset`` picks one), both decoding each record
with ``shopee_tpu.data.read.decode``.

Training reads shards interleaved (remote ones in parallel, in any order unless
asked for a fixed one), shuffles one pass at a time and repeats, decodes in
parallel and flips each image while it is uint8, batches with
``drop_remainder=True`` so every shape is static for TPUs, then runs the other
augmentations per batch, if any (``shopee-tpu bench input`` measures what each
step costs). Evaluation reads the files in order, once, and keeps ids aligned with
images; it keeps the last partial batch, or with ``pad=True`` fills it with blank
rows of sample weight 0 (validation on N replicas: full batches, each record counted
once).

Images leave both as uint8 pixels (the model input contract's 0..255): a quarter of
the bytes of float32 on their way to the device, where the model casts and
normalises them. On several hosts each pipeline reads only its own part of the
records, the same part in every epoch, and the parts are equal to a record
(``data.read.sharding``): the hosts' rows are disjoint in every epoch and together cover
the records once per pass, whatever the shard sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from shopee_tpu import fs
from shopee_tpu.data.manifests import manifest_beside
from shopee_tpu.data.read import decode
from shopee_tpu.data.read.augment import (
    augment_batch,
    flip_by_bits,
    mix_batch,
    needs_float,
    needs_mixing,
)
from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.data.read.files import count_records, holdout_files, list_files
from shopee_tpu.data.read.sharding import Part, host_part, part_sizes
from shopee_tpu.data.schemas import Schema, check_features, get_schema, probe_features

__all__ = [
    "load_dataset",
    "train_dataset",
    "eval_dataset",
    "eval_batches",
    "read_ids_labels",
    "list_files",
    "count_records",
    "holdout_files",
]


@dataclasses.dataclass(frozen=True)
class _Source:
    """The records a pipeline reads, checked once: files, schema, features."""

    files: list[str]
    schema: Schema
    found: dict[str, str]
    num_classes: int | None


def _source(files_or_pattern, schema, num_classes, need_label: bool) -> _Source:
    schema = get_schema(schema)
    files = list_files(files_or_pattern)
    found = probe_features(files[0])
    check_features(schema, found, files[0], need_label=need_label)
    if need_label:
        num_classes = num_classes or manifest_beside(files[0]).get("num_classes")
        if not num_classes:
            raise ValueError(
                "num_classes is needed for one-hot labels and no manifest.json "
                f"beside {files[0]} gives it; pass num_classes="
            )
    return _Source(files, schema, found, num_classes)


def _options(shard_here: bool, deterministic: bool):
    opts = decode.tf().data.Options()
    # With several workers we shard ourselves, so a TF strategy must not shard
    # again (OFF). With one pipeline, a multi-worker strategy may still shard:
    # DATA works for any file count, where FILE fails when there are fewer files
    # than workers.
    policy = decode.tf().data.experimental.AutoShardPolicy
    opts.experimental_distribute.auto_shard_policy = (
        policy.OFF if shard_here else policy.DATA
    )
    opts.deterministic = deterministic
    return opts


def train_dataset(
    files_or_pattern,
    *,
    schema: str | Schema = "shopee_tpu",
    image_size: int,
    batch_size: int,
    num_classes: int | None = None,
    augment=None,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    cache: bool = False,
    num_workers: int = 1,
    worker_index: int = 0,
    value_range: tuple[float, float] = (0, 255),
    deterministic: bool = False,
    keep_ids: Collection[str] | None = None,
):
    """Shuffled, repeated, augmented ``(images, one-hot labels)`` batches with
    ``drop_remainder=True``. See :func:`load_dataset` for the arguments."""
    tf = decode.tf()
    src = _source(files_or_pattern, schema, num_classes, need_label=True)
    part = host_part(src.files, num_workers, worker_index)
    shared = num_workers > 1
    # This worker's own draws: shuffling and augmentation differ between hosts.
    if shared and seed is not None:
        seed = seed * num_workers + worker_index
    records = _shuffled_records(part, seed, cache, deterministic)
    if part.stride:
        records = records.shard(num_workers, worker_index)
    if cache:
        records = records.cache()
    if keep_ids is not None:
        records = records.filter(
            decode.id_filter(keep_ids, src.schema, src.found, src.files[0])
        )
    # Shuffled one pass at a time: an epoch holds each record once (give or take
    # a batch), where a shuffle after the repeat would mix several passes when the
    # buffer is larger than the data.
    records = records.shuffle(shuffle_buffer, seed=seed).repeat()
    if _random(augment):
        # One seeded draw paired with each record before the parallel map, so the
        # draws do not depend on which thread decodes what.
        records = tf.data.Dataset.zip(tf.data.Dataset.random(seed=seed), records)
    decoded = _decode_for_training(src, image_size, augment)
    ds = records.map(
        decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    finish = _finish_batch(src.num_classes, augment, value_range)
    ds = ds.map(
        finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
    )
    options = _options(shared, deterministic)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _shuffled_records(part: Part, seed, cache: bool, deterministic: bool):
    """One pass over this host's records, its files in a seeded order that changes
    each pass (kept from the first pass when cached), read interleaved. A
    ``stride`` part is one fixed stream, the same on every host."""
    tf = decode.tf()
    segments = _segments(part)
    if not (cache or part.stride):
        segments = segments.shuffle(max(1, len(part.files)), seed=seed)
    # Remote files (gs://) are read by parallel workers, which hide each request's
    # latency. Local ones are read by the thread that fills the shuffle buffer: a
    # parallel interleave costs a thread hand-off per record (bench input counts
    # the context switches), for reads that take microseconds.
    parallel = {}
    if part.files and fs.is_remote(part.files[0]):
        parallel = dict(
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic or part.stride,
        )
    return segments.interleave(
        lambda f, skip, take: (
            tf.data.TFRecordDataset(f, buffer_size=decode.READ_BUFFER)
            .skip(skip)
            .take(take)
        ),
        cycle_length=max(1, min(len(part.files), 16)),
        **parallel,
    )


def _segments(part: Part):
    """``(file, records to skip, records to read)`` of each file of a host's part."""
    tf = decode.tf()
    return tf.data.Dataset.from_tensor_slices(
        (
            tf.constant(part.files, tf.string, shape=[len(part.files)]),
            tf.constant(part.skip, tf.int64, shape=[len(part.files)]),
            tf.constant(part.take, tf.int64, shape=[len(part.files)]),
        )
    )


def _flips(augment):
    """The flips of ``augment`` (run per image), or None."""
    return augment if augment and (augment.flip_lr or augment.flip_ud) else None


def _per_batch(augment):
    """The augmentations of ``augment`` that run per batch, or None: flips run
    per image, and with nothing else asked the batch stays uint8 (no float32
    round trip)."""
    if augment is None:
        return None
    rest = dataclasses.replace(augment, flip_lr=False, flip_ud=False)
    return rest if needs_float(rest) or needs_mixing(rest) else None


def _random(augment) -> bool:
    """Does training with ``augment`` draw random numbers?"""
    return _flips(augment) is not None or _per_batch(augment) is not None


def _decode_for_training(src: _Source, image_size: int, augment):
    """``([draw,] record) -> (uint8 image, label[, draw])``, flipped as asked.

    Flips run per image while it is uint8 and still in cache, from the bits of the
    record's draw; the other augmentations run per batch, seeded by the batch's
    first and last draws (``bench input`` measures what each step costs)."""
    parse = decode.record_parser(src.schema, src.found, ("image", "label"))
    exact = decode.stored_exactly(src.files, image_size)
    flips = _flips(augment)

    def image_label(record):
        ex = parse(record)
        return decode.decode_image(ex["image"], image_size, exact=exact), ex["label"]

    if not _random(augment):
        return decode.plain(image_label)

    def drawn(draw, record):
        image, label = image_label(record)
        if flips is not None:
            image = flip_by_bits(image, flips, draw)
        return image, label, draw

    return decode.plain(drawn)


def _finish_batch(num_classes: int, augment, value_range):
    """The per-batch step: one-hot labels, the augmentations other than flips (one
    vectorised op per batch costs far less in tf.data than one per image), and
    the output pixels."""
    tf = decode.tf()
    rest = _per_batch(augment)

    def finish(images, labels, draws=None):
        onehot = tf.one_hot(labels, num_classes)
        if rest is not None:
            seed = tf.stack([draws[0], draws[-1]])  # any batch size, even 1
            s = tf.random.experimental.stateless_split(seed, 2)
            images = augment_batch(images, rest, seed=s[0], dtype=tf.float32)
            if needs_mixing(rest):
                images, onehot = mix_batch(images, onehot, rest, seed=s[1])
        return decode.to_output(images, value_range), onehot

    return decode.plain(finish)


def eval_dataset(
    files_or_pattern,
    *,
    schema: str | Schema = "shopee_tpu",
    image_size: int,
    batch_size: int,
    labels: bool = False,
    num_classes: int | None = None,
    cache: bool = False,
    num_workers: int = 1,
    worker_index: int = 0,
    value_range: tuple[float, float] = (0, 255),
    pad: bool = False,
    keep_ids: Collection[str] | None = None,
):
    """Every record exactly once in file order: ``(images, one-hot labels)`` or
    ``(images, ids)``, and with ``pad`` a sample weight. See :func:`load_dataset`."""
    tf = decode.tf()
    src = _source(files_or_pattern, schema, num_classes, need_label=labels)
    part = host_part(src.files, num_workers, worker_index)
    records = _segments(part).flat_map(
        lambda f, skip, take: (
            tf.data.TFRecordDataset(f, buffer_size=decode.READ_BUFFER)
            .skip(skip)
            .take(take)
            .enumerate()
            .map(lambda i, r: (f, i + skip, r))
        )
    )
    if part.stride:
        records = records.shard(num_workers, worker_index)
    if keep_ids is not None:
        keep = decode.id_filter(keep_ids, src.schema, src.found, src.files[0])
        records = records.filter(lambda f, i, r: keep(r))
    ds = records.map(
        _decode_for_eval(src, src.files, image_size, labels),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if pad:
        ds, batches = _pad_to_batches(
            ds, src.files, batch_size, num_workers, worker_index, keep_ids
        )
    else:
        ds = ds.batch(batch_size, drop_remainder=False)
        n = decode.known_count(src.files) if num_workers == 1 else None
        if keep_ids is not None and num_workers == 1:
            n = len({str(k) for k in keep_ids})  # each kept id is in the files once
        batches = None if n is None else _batches(n, batch_size)
    if batches is not None:
        # Telling tf.data the batch count lets Keras size validation epochs
        # instead of running into the end of the data (and warning) each epoch.
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    if cache:
        ds = ds.cache()  # uint8: a quarter of the memory of float batches
    ds = ds.map(
        decode.plain(lambda x, *rest: (decode.to_output(x, value_range), *rest))
    )
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_workers > 1, True))


def _decode_for_eval(src: _Source, files: list[str], image_size: int, labels: bool):
    """``(file, index, record) -> (uint8 image, one-hot label or id)``; records
    without an id feature get ``"<file name>:<index>"``."""
    tf = decode.tf()
    roles = ("image", "label") if labels else ("image", "id")
    parse = decode.record_parser(src.schema, src.found, roles)
    make_ids = not (src.schema.id and src.schema.id in src.found)
    exact = decode.stored_exactly(files, image_size)

    def decoded(f, i, record):
        ex = parse(record)
        image = decode.decode_image(ex["image"], image_size, exact=exact)
        if labels:
            return image, tf.one_hot(ex["label"], src.num_classes)
        if make_ids:
            return image, decode.made_id(f, i)
        return image, ex["id"]

    return decode.plain(decoded)


def eval_batches(
    files_or_pattern,
    batch_size: int,
    num_workers: int = 1,
    keep_ids: Collection[str] | None = None,
) -> int:
    """Batches per worker of ``eval_dataset(..., pad=True)``: enough for the
    worker with the most records (all yield this many).

    Raises:
        ValueError: The record count is unknown (no count in the file names and no
            manifest); it is never scanned implicitly.
    """
    counts = part_sizes(list_files(files_or_pattern), num_workers, keep_ids)
    return _even_batches(counts, batch_size)


def _batches(records: int, batch_size: int) -> int:
    """Batches that hold ``records`` rows, the last one perhaps partial."""
    return -(-records // batch_size)


def _even_batches(counts: list[int], batch_size: int) -> int:
    """Batches per worker when each yields as many as the one with the most
    records (``counts``), and at least one."""
    return max(1, _batches(max(counts), batch_size))


def _pad_to_batches(
    ds, files, batch_size: int, num_workers: int, worker_index: int, keep_ids=None
):
    """Adds a weight to each ``(image, y)`` and blank weight-0 rows after the last
    record; returns ``(batched dataset, batch count or None)``."""
    tf = decode.tf()
    ds = ds.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    blank = tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec
    )
    try:
        counts = part_sizes(files, num_workers, keep_ids)
        n = counts[worker_index]
        batches = _even_batches(counts, batch_size)
    except ValueError:
        if num_workers > 1:
            raise ValueError(
                f"evaluation over {num_workers} workers needs the record counts of "
                f"{files[0]} ...: every worker must yield the same number of "
                "batches; write the records with `shopee-tpu tfrecords` (manifest) "
                "or name them ...-<count>.tfrec"
            ) from None
        # One worker with an unknown count: batch_size - 1 blanks complete the
        # last batch; a batch made only of blanks is dropped.
        filler = tf.data.Dataset.from_tensors(blank).repeat(batch_size - 1)
        return ds.concatenate(filler).batch(batch_size, drop_remainder=True), None
    filler = tf.data.Dataset.from_tensors(blank).repeat(batches * batch_size - n)
    return ds.concatenate(filler).batch(batch_size, drop_remainder=True), batches


def load_dataset(files_or_pattern, *, training: bool, labels: bool | None = None, **kw):
    """Builds the ``tf.data`` pipeline over TFRecord shards: ``train_dataset`` when
    ``training``, else ``eval_dataset``.

    Args:
        files_or_pattern: Folder, glob, file or list (local or gs://).
        training: ``True``: shuffled, repeated, augmented ``(images, one-hot
            labels)`` with ``drop_remainder=True``. ``False``: every record exactly
            once in file order, last partial batch kept.
        labels: Evaluation only: ``True`` yields ``(images, one-hot labels)``,
            otherwise ``(images, ids)``. Records without an id feature get ids
            ``"<file name>:<index>"``.
        schema: A name in ``shopee_tpu.data.schemas.SCHEMAS`` or a
            :class:`~shopee_tpu.data.schemas.Schema` with your feature names.
        image_size: Side of the square output images.
        batch_size: Global batch size.
        num_classes: One-hot width; default: the manifest's ``num_classes``.
        augment: Training: an ``AugmentConfig`` (``None``: no augmentation).
        seed: Training: seed for file order, shuffling and augmentation (with
            several workers each shuffles and augments with its own seed derived
            from it).
        shuffle_buffer: Training: records in the shuffle buffer.
        cache: Training: keep the raw records in memory after the first pass.
            Evaluation: keep the decoded batches.
        num_workers: Input pipelines (hosts) sharing the data; each reads its own
            part, a range of the records in file order fixed for the run, the
            parts equal to a record (``shopee_tpu.data.read.sharding``; without record
            counts: whole files, or every ``num_workers``-th record when there
            are fewer files than workers). Evaluation yields the records of its
            part in file order.
        worker_index: This pipeline's index, ``0 <= worker_index < num_workers``.
        value_range: Output pixel range; ``(0, 255)``, the model input contract,
            yields uint8 pixels, any other range float32.
        pad: Evaluation: fill the last batch with blank records and yield a third
            element, the sample weight (1 real, 0 padding), so every batch has
            ``batch_size`` rows (static shapes that split over any number of
            replicas) and metrics weighted by it count each record exactly once.
            With ``num_workers > 1`` every worker yields the same number of batches
            (``eval_batches``), so they can step together.
        deterministic: Training: keep the order of the parallel reads and maps
            fixed, so a seed always gives the same batches (evaluation always is).
        keep_ids: Read only the records whose id is in this set (one fold of a
            k-fold run). The records must carry an id feature, and each id must be
            in them exactly once (evaluation counts its batches from them).

    Returns:
        A ``tf.data.Dataset``.

    Raises:
        ValueError: The records lack a feature the schema needs (named in the
            message with the schema), or ``num_classes`` is unknown.
    """
    if training:
        return train_dataset(files_or_pattern, **kw)
    return eval_dataset(files_or_pattern, labels=bool(labels), **kw)
