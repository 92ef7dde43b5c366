"""``load_dataset``: TFRecords to batches for training, evaluation and prediction.

Training reads shards interleaved and in parallel, in any order unless asked for a
fixed one, shuffles and repeats, decodes (at 1/2, 1/4 or 1/8 scale straight from the JPEG
DCT when the stored image is at least that much larger than needed), resizes only
when the size differs, flips each image while it is uint8, batches with
``drop_remainder=True`` so every shape is static for TPUs, then runs the other
augmentations per batch (``shopee-tpu bench input`` measures what each costs).
Evaluation reads the files in order, once, and keeps ids aligned with images; it
keeps the last partial batch, or with ``pad=True`` fills it with blank rows of
sample weight 0 (validation on N replicas: full batches, each record counted once).

Images leave the pipeline as uint8 pixels (the model input contract's 0..255): a
quarter of the bytes of float32 on their way to the device, where the model casts
and normalises them. On several hosts each training pipeline keeps every N-th
record of one stream that all hosts read in the same order, so the hosts' rows are
disjoint and together cover the records once per pass, whatever the shard sizes.
"""

from __future__ import annotations

import os
from collections.abc import Collection

from shopee_tpu.data._tf import tf as _tf
from shopee_tpu.data.files import count_records, holdout_files, list_files
from shopee_tpu.data.schemas import Schema, check_features, get_schema, probe_features

__all__ = [
    "load_dataset",
    "eval_batches",
    "read_ids_labels",
    "list_files",
    "count_records",
    "holdout_files",
    "decode_image",
]

_READ_BUFFER = 8 << 20  # bytes read ahead per file (GCS likes large reads)


def decode_image(jpeg, image_size: int, *, exact: bool = False):
    """JPEG bytes -> uint8 ``[image_size, image_size, 3]``.

    Decodes at the coarsest DCT scale (1, 1/2, 1/4, 1/8) that keeps the short side
    >= ``image_size``, then resizes (bilinear) unless the size already matches.
    Pixels stay uint8 per image (a quarter of the memory traffic of float32); the
    pipeline converts whole batches.

    Args:
        jpeg: Scalar string tensor.
        image_size: Output side.
        exact: The images are known to be ``image_size`` squares (our manifest
            says so): decode only.
    """
    tf = _tf()
    if exact:
        image = tf.io.decode_jpeg(jpeg, channels=3)
        return tf.ensure_shape(image, [image_size, image_size, 3])
    shape = tf.io.extract_jpeg_shape(jpeg)
    short = tf.minimum(shape[0], shape[1])
    index = tf.reduce_sum(
        tf.cast(short >= image_size * tf.constant([2, 4, 8]), tf.int32)
    )
    branches = [
        (lambda r=r: tf.io.decode_jpeg(jpeg, channels=3, ratio=r)) for r in (1, 2, 4, 8)
    ]
    image = tf.switch_case(index, branches)
    same = tf.logical_and(
        tf.shape(image)[0] == image_size, tf.shape(image)[1] == image_size
    )
    image = tf.cond(
        same,
        lambda: image,
        lambda: tf.saturate_cast(
            tf.round(tf.image.resize(image, [image_size, image_size])), tf.uint8
        ),
    )
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _stored_exactly(files: list[str], image_size: int) -> bool:
    """True when our manifest says every image is an ``image_size`` square."""
    from shopee_tpu.data.manifests import read_manifest

    folders = {os.path.dirname(f) or "." for f in files}
    try:
        manifests = [read_manifest(d) for d in folders]
    except FileNotFoundError:
        return False
    return all(
        m.get("image_size") == image_size and m.get("resize") == "square"
        for m in manifests
    )


def _plain(fn):
    """Skips autograph: these functions use tf.cond/switch_case explicitly."""
    return _tf().autograph.experimental.do_not_convert(fn)


def _known_count(files) -> int | None:
    """The record count from names or the manifest; None when only a scan could tell."""
    try:
        return count_records(files)
    except ValueError:
        return None


def _manifest_classes(files: list[str]) -> int | None:
    from shopee_tpu.data.manifests import read_manifest

    folder = os.path.dirname(files[0]) or "."
    try:
        return int(read_manifest(folder).get("num_classes") or 0) or None
    except FileNotFoundError:
        return None


def _parser(schema: Schema, found: dict[str, str], roles: tuple[str, ...]):
    """A function serialized record -> dict of the asked ``roles`` that exist.

    Roles: ``image``, ``label``, ``id``, ``group``, ``md5``. Parsing only what a
    mode needs saves a string copy per feature per image.
    """
    tf = _tf()
    kinds = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    spec = {}
    for role in roles:
        name = getattr(schema, role)
        if name and name in found:
            spec[role] = (name, kinds[found[name]] if role == "label" else tf.string)
    features = {name: tf.io.FixedLenFeature([], dtype) for name, dtype in spec.values()}

    def parse(record):
        parsed = tf.io.parse_single_example(record, features)
        out = {role: parsed[name] for role, (name, _) in spec.items()}
        if "label" in out:
            out["label"] = tf.cast(out["label"], tf.int32)
        return out

    return parse


def _to_output(images, value_range):
    """A batch of pixels (uint8, or float from augmentation) in 0..255 -> what
    ``load_dataset`` yields: uint8 for the model input contract's 0..255 (rounded
    and clipped), else float32 scaled to ``value_range``."""
    tf = _tf()
    lo, hi = value_range
    if (lo, hi) == (0, 255):
        if images.dtype == tf.uint8:
            return images
        return tf.saturate_cast(tf.round(images), tf.uint8)
    # Interpolating augmentations may overshoot 0..255 by a rounding error.
    images = tf.clip_by_value(tf.cast(images, "float32"), 0.0, 255.0)
    return images * ((hi - lo) / 255.0) + lo


def _worker_counts(
    files: list[str], num_workers: int, keep_ids: Collection[str] | None = None
) -> list[int]:
    """Records each evaluation pipeline reads, split as ``load_dataset`` splits
    (and, with ``keep_ids``, filters)."""
    by_file = num_workers > 1 and len(files) >= num_workers
    if keep_ids is None:
        if by_file:
            return [count_records(files[w::num_workers]) for w in range(num_workers)]
        n = count_records(files)
        return [len(range(w, n, num_workers)) for w in range(num_workers)]
    keep = {str(k) for k in keep_ids}
    if num_workers == 1:
        return [len(keep)]  # each kept id is in the files exactly once
    # Several workers: which kept ids each one meets needs the ids in file order.
    if by_file:
        return [
            int(read_ids_labels(files[w::num_workers])["id"].isin(keep).sum())
            for w in range(num_workers)
        ]
    kept = read_ids_labels(files)["id"].isin(keep).to_numpy()
    return [int(kept[w::num_workers].sum()) for w in range(num_workers)]


def eval_batches(
    files_or_pattern,
    batch_size: int,
    num_workers: int = 1,
    keep_ids: Collection[str] | None = None,
) -> int:
    """Batches per worker of ``load_dataset(..., training=False, pad=True)``: enough
    for the worker with the most records (all yield this many).

    Raises:
        ValueError: The record count is unknown (no count in the file names and no
            manifest); it is never scanned implicitly.
    """
    counts = _worker_counts(list_files(files_or_pattern), num_workers, keep_ids)
    return max(1, -(-max(counts) // batch_size))


def _pad_to_batches(
    ds, files, batch_size: int, num_workers: int, worker_index: int, keep_ids=None
):
    """Adds a weight to each ``(image, y)`` and blank weight-0 rows after the last
    record; returns ``(batched dataset, batch count or None)``."""
    tf = _tf()
    ds = ds.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    blank = tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec
    )
    try:
        counts = _worker_counts(files, num_workers, keep_ids)
        n = counts[worker_index]
        batches = max(1, -(-max(counts) // batch_size))
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


def _split_flips(augment):
    """``augment`` -> (the flips, done per image as it is decoded; the rest, done
    per batch). Either is ``None`` when there is nothing of it to do."""
    import dataclasses

    if augment is None:
        return None, None
    flips = augment if (augment.flip_lr or augment.flip_ud) else None
    return flips, dataclasses.replace(augment, flip_lr=False, flip_ud=False)


def load_dataset(
    files_or_pattern,
    *,
    schema: str | Schema = "shopee_tpu",
    image_size: int,
    batch_size: int,
    training: bool,
    labels: bool | None = None,
    num_classes: int | None = None,
    augment=None,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    cache: bool = False,
    num_workers: int = 1,
    worker_index: int = 0,
    value_range: tuple[float, float] = (0, 255),
    pad: bool = False,
    deterministic: bool = False,
    keep_ids: Collection[str] | None = None,
):
    """Builds the ``tf.data`` pipeline over TFRecord shards.

    Args:
        files_or_pattern: Folder, glob, file or list (local or gs://).
        schema: ``shopee_tpu``, ``flowers``, ``melanoma``, ``shopee-community`` or a
            :class:`~shopee_tpu.data.schemas.Schema` with your feature names.
        image_size: Side of the square output images.
        batch_size: Global batch size.
        training: ``True``: shuffled, repeated, augmented ``(images, one-hot
            labels)`` with ``drop_remainder=True``. ``False``: every record exactly
            once in file order, last partial batch kept.
        labels: Evaluation only: ``True`` yields ``(images, one-hot labels)``,
            otherwise ``(images, ids)``. Records without an id feature get ids
            ``"<file name>:<index>"``.
        num_classes: One-hot width; default: the manifest's ``num_classes``.
        augment: An ``AugmentConfig`` for training (``None``: no augmentation).
        seed: Seed for file order, shuffling and augmentation (with several
            workers the file order is shared, and each worker shuffles and
            augments with its own seed derived from it).
        shuffle_buffer: Records in the shuffle buffer.
        cache: Training: keep the raw records in memory after the first pass.
            Evaluation: keep the decoded batches.
        num_workers: Input pipelines (hosts) sharing the data; each reads its part.
            Training: every ``num_workers``-th record of a stream all workers
            read in the same order (disjoint rows, balanced whatever the file
            sizes). Evaluation: whole files when there are at least as many
            files, else every ``num_workers``-th record.
        worker_index: This pipeline's index, ``0 <= worker_index < num_workers``.
        value_range: Output pixel range; ``(0, 255)``, the model input contract,
            yields uint8 pixels, any other range float32.
        pad: Evaluation only: fill the last batch with blank records and yield a
            third element, the sample weight (1 real, 0 padding), so every batch
            has ``batch_size`` rows (static shapes that split over any number of
            replicas) and metrics weighted by it count each record exactly once.
            With ``num_workers > 1`` every worker yields the same number of
            batches (``eval_batches``), so they can step together.
        deterministic: Training: keep the order of the parallel reads and maps
            fixed, so a seed always gives the same batches (evaluation always is).
        keep_ids: Read only the records whose id is in this set (one fold of a
            k-fold run). The records must carry an id feature, and each id must
            be in them exactly once (evaluation counts its batches from them).

    Returns:
        A ``tf.data.Dataset``.

    Raises:
        ValueError: The records lack a feature the schema needs (named in the
            message with the schema), or ``num_classes`` is unknown.
    """
    tf = _tf()
    from shopee_tpu.data.augment import (
        augment_batch,
        flip_image,
        mix_batch,
        needs_mixing,
    )

    schema = get_schema(schema)
    files = list_files(files_or_pattern)
    need_label = training or bool(labels)
    found = probe_features(files[0])
    check_features(schema, found, files[0], need_label=need_label)
    if need_label:
        num_classes = num_classes or _manifest_classes(files)
        if not num_classes:
            raise ValueError(
                "num_classes is needed for one-hot labels and no manifest.json "
                f"beside {files[0]} gives it; pass num_classes="
            )
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} not in [0, {num_workers})")
    # Evaluation splits whole files where it can (counts come from names or the
    # manifest); training splits the record stream (see the module docstring).
    by_file = not training and num_workers > 1 and len(files) >= num_workers
    if by_file:
        files = files[worker_index::num_workers]
    roles = ("image", "label") if need_label else ("image", "id")
    parse = _parser(schema, found, roles)
    make_ids = not (schema.id and schema.id in found)
    exact = _stored_exactly(files, image_size)

    opts = tf.data.Options()
    # With num_workers > 1 we shard ourselves (by file when every worker gets one,
    # else by record), so a TF strategy must not shard again (OFF). With one
    # pipeline, a multi-worker strategy may still shard: DATA works for any file
    # count, where FILE fails when there are fewer files than workers.
    policy = tf.data.experimental.AutoShardPolicy
    opts.experimental_distribute.auto_shard_policy = (
        policy.OFF if num_workers > 1 else policy.DATA
    )
    opts.deterministic = deterministic or not training

    if not training:
        names = tf.data.Dataset.from_tensor_slices(files)
        records = names.flat_map(
            lambda f: (
                tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER)
                .enumerate()
                .map(lambda i, r: (f, i, r))
            )
        )
        if num_workers > 1 and not by_file:
            records = records.shard(num_workers, worker_index)
        if keep_ids is not None:
            keep = _id_filter(keep_ids, schema, found, files[0])
            records = records.filter(lambda f, i, r: keep(r))

        def decode_eval(f, i, record):
            ex = parse(record)
            image = decode_image(ex["image"], image_size, exact=exact)
            if labels:
                return image, tf.one_hot(ex["label"], num_classes)
            if make_ids:
                base = tf.strings.split(f, "/")[-1]
                return image, tf.strings.join([base, tf.strings.as_string(i)], ":")
            return image, ex["id"]

        ds = records.map(_plain(decode_eval), num_parallel_calls=tf.data.AUTOTUNE)
        if pad:
            every_file = list_files(files_or_pattern)  # `files` is this worker's
            ds, batches = _pad_to_batches(
                ds, every_file, batch_size, num_workers, worker_index, keep_ids
            )
        else:
            ds = ds.batch(batch_size, drop_remainder=False)
            n = _known_count(files) if num_workers == 1 else None
            if keep_ids is not None and num_workers == 1:
                n = len({str(k) for k in keep_ids})  # each kept id is in the files once
            batches = None if n is None else -(-n // batch_size)
        if batches is not None:
            # Telling tf.data the batch count lets Keras size validation epochs
            # instead of running into the end of the data (and warning) each epoch.
            ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
        if cache:
            ds = ds.cache()  # uint8: a quarter of the memory of float batches
        ds = ds.map(_plain(lambda x, *rest: (_to_output(x, value_range), *rest)))
        return ds.prefetch(tf.data.AUTOTUNE).with_options(opts)

    names = tf.data.Dataset.from_tensor_slices(files)
    shared = num_workers > 1  # the stream before the shard must match on every host
    read = dict(
        cycle_length=min(len(files), 16),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic or shared,
    )

    def reader(f):
        return tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER)

    if shared and seed is None:
        raise ValueError(
            f"training on {num_workers} workers needs a seed: every worker must "
            "read the files in the same order to keep disjoint records"
        )
    if not cache:  # a new file order each pass (the cache keeps the first)
        names = names.shuffle(len(files), seed=seed)
    records = names.interleave(reader, **read)
    if shared:
        records = records.shard(num_workers, worker_index)
    if cache:
        records = records.cache()
    if keep_ids is not None:
        records = records.filter(_id_filter(keep_ids, schema, found, files[0]))
    # This worker's own draws: shuffling and augmentation differ between hosts.
    if shared:
        seed = seed * num_workers + worker_index
    # Shuffled one pass at a time: an epoch holds each record once (give or take
    # a batch), where a shuffle after the repeat would mix several passes when
    # the buffer is larger than the data.
    records = records.shuffle(shuffle_buffer, seed=seed).repeat()
    flips, per_batch = _split_flips(augment)
    # One draw per stream position: flips need no zipped seed dataset.
    flip_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")

    def decode_train(i, record):
        ex = parse(record)
        image = decode_image(ex["image"], image_size, exact=exact)
        if flips is not None:
            image = flip_image(
                image, flips, tf.stack([tf.constant(flip_seed, tf.int64), i])
            )
        return image, ex["label"]

    def finish(batch, batch_seed):
        # The other augmentations run on whole batches: one vectorised op per
        # batch costs far less in tf.data than one small op per image.
        images, onehot = batch[0], tf.one_hot(batch[1], num_classes)
        if per_batch is not None:
            s = tf.random.experimental.stateless_split(batch_seed, 2)
            images = augment_batch(images, per_batch, seed=s[0], dtype=tf.float32)
            if needs_mixing(per_batch):
                images, onehot = mix_batch(images, onehot, per_batch, seed=s[1])
        return _to_output(images, value_range), onehot

    ds = records.enumerate().map(
        _plain(decode_train),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        _plain(finish),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    return ds.prefetch(tf.data.AUTOTUNE).with_options(opts)


def _id_filter(keep_ids: Collection[str], schema: Schema, found, where: str):
    """A predicate on serialized records: is the record's id in ``keep_ids``?"""
    tf = _tf()
    if not (schema.id and schema.id in found):
        raise ValueError(
            f"{where}: selecting records by id (keep_ids) needs an id feature, and "
            f"these records have none for schema {schema.name!r}"
        )
    parse_id = _parser(schema, found, ("id",))
    keys = sorted({str(k) for k in keep_ids})
    if not keys:
        return lambda record: tf.constant(False)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, tf.string), tf.ones(len(keys), tf.int32)
        ),
        default_value=0,
    )
    return _plain(lambda record: table.lookup(parse_id(record)["id"]) > 0)


def read_ids_labels(
    files_or_pattern, schema: str | Schema = "shopee_tpu", *, verbose: bool = False
):
    """Ids, labels, groups and MD5s of every record, without decoding images.

    The order equals the evaluation order of :func:`load_dataset` on the same files.
    Missing features give ``""`` (text) or ``-1`` (label); missing ids are made as in
    :func:`load_dataset`. ``verbose`` shows a progress bar over the records.

    Returns:
        A pandas DataFrame with columns ``id, label, group, md5``.
    """
    import pandas as pd

    from shopee_tpu.console import progress_bar

    tf = _tf()
    schema = get_schema(schema)
    files = list_files(files_or_pattern)
    found = probe_features(files[0])
    check_features(schema, found, files[0], need_label=False)
    parse = _parser(schema, found, ("label", "id", "group", "md5"))
    cols: dict[str, list] = {"id": [], "label": [], "group": [], "md5": []}
    bar = progress_bar(
        _known_count(files), "scan records", unit="rec", disable=not verbose
    )
    for path in files:
        base = path.rsplit("/", 1)[-1]
        ds = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).map(
            lambda r: parse(r) | {"_n": tf.constant(0)}
        )
        start = 0
        for ex in ds.batch(4096).as_numpy_iterator():
            n = len(ex["_n"])
            for role in ("id", "group", "md5"):
                if role in ex:
                    cols[role].extend(v.decode("utf-8") for v in ex[role])
                elif role == "id":
                    cols["id"].extend(f"{base}:{start + j}" for j in range(n))
                else:
                    cols[role].extend([""] * n)
            cols["label"].extend(ex["label"].tolist() if "label" in ex else [-1] * n)
            start += n
            bar.update(n)
    bar.close()
    return pd.DataFrame(cols)
