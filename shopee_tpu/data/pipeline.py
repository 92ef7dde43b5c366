"""``load_dataset``: TFRecords to batches for training, evaluation and prediction.

Training reads shards interleaved and in parallel with ``deterministic=False``,
shuffles and repeats, decodes (at 1/2, 1/4 or 1/8 scale straight from the JPEG
DCT when the stored image is at least that much larger than needed), resizes only
when the size differs, augments, and batches with ``drop_remainder=True`` so every
shape is static for TPUs. Evaluation reads the files in order, once, keeps the last
partial batch and keeps ids aligned with images.
"""

from __future__ import annotations

import os
from collections.abc import Collection

from shopee_tpu.data._tf import tf as _tf
from shopee_tpu.data.files import count_records, holdout_files, list_files
from shopee_tpu.data.schemas import Schema, check_features, get_schema, probe_features

__all__ = [
    "load_dataset",
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


def _to_float(images, value_range):
    """uint8 batch -> float32 in ``value_range``."""
    images = _tf().cast(images, "float32")
    lo, hi = value_range
    if (lo, hi) == (0, 255):
        return images
    return images * ((hi - lo) / 255.0) + lo


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
        seed: Seed for file order, shuffling and augmentation.
        shuffle_buffer: Records in the shuffle buffer.
        cache: Training: keep the raw records in memory after the first pass.
            Evaluation: keep the decoded batches.
        num_workers: Input pipelines (hosts) sharing the data; each reads its part:
            whole files when there are at least as many files, else every
            ``num_workers``-th record.
        worker_index: This pipeline's index, ``0 <= worker_index < num_workers``.
        value_range: Output pixel range; ``(0, 255)`` is the model input contract.
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
    from shopee_tpu.data.augment import augment_batch, mix_batch, needs_mixing

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
    by_file = num_workers > 1 and len(files) >= num_workers
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
    opts.deterministic = not training

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
        ds = ds.batch(batch_size, drop_remainder=False)
        n = _known_count(files) if num_workers == 1 else None
        if keep_ids is not None and num_workers == 1:
            n = len({str(k) for k in keep_ids})  # each kept id is in the files once
        if n is not None:
            # Telling tf.data the batch count lets Keras size validation epochs
            # instead of running into the end of the data (and warning) each epoch.
            ds = ds.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
        if cache:
            ds = ds.cache()  # uint8: a quarter of the memory of float batches
        ds = ds.map(_plain(lambda x, y: (_to_float(x, value_range), y)))
        return ds.prefetch(tf.data.AUTOTUNE).with_options(opts)

    names = tf.data.Dataset.from_tensor_slices(files)
    read = dict(
        cycle_length=min(len(files), 16),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )

    def reader(f):
        return tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER)

    if cache:
        records = names.interleave(reader, **read)
        if num_workers > 1 and not by_file:
            records = records.shard(num_workers, worker_index)
        records = records.cache().repeat()
    else:
        names = names.shuffle(len(files), seed=seed).repeat()
        records = names.interleave(reader, **read)
        if num_workers > 1 and not by_file:
            records = records.shard(num_workers, worker_index)
    if keep_ids is not None:
        records = records.filter(_id_filter(keep_ids, schema, found, files[0]))
    records = records.shuffle(shuffle_buffer, seed=seed)

    def decode_train(record):
        ex = parse(record)
        return decode_image(ex["image"], image_size, exact=exact), ex["label"]

    def finish(batch, batch_seed):
        # Augmentation runs on whole batches: one vectorised op per batch costs
        # far less in tf.data than one small op per image.
        images, onehot = batch[0], tf.one_hot(batch[1], num_classes)
        if augment is None:
            images = tf.cast(images, tf.float32)
        else:
            s = tf.random.experimental.stateless_split(batch_seed, 2)
            images = augment_batch(images, augment, seed=s[0], dtype=tf.float32)
            if needs_mixing(augment):
                images, onehot = mix_batch(images, onehot, augment, seed=s[1])
        return _to_float(images, value_range), onehot

    ds = records.map(
        _plain(decode_train), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        _plain(finish), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
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


def read_ids_labels(files_or_pattern, schema: str | Schema = "shopee_tpu"):
    """Ids, labels, groups and MD5s of every record, without decoding images.

    The order equals the evaluation order of :func:`load_dataset` on the same files.
    Missing features give ``""`` (text) or ``-1`` (label); missing ids are made as in
    :func:`load_dataset`.

    Returns:
        A pandas DataFrame with columns ``id, label, group, md5``.
    """
    import pandas as pd

    tf = _tf()
    schema = get_schema(schema)
    files = list_files(files_or_pattern)
    found = probe_features(files[0])
    check_features(schema, found, files[0], need_label=False)
    parse = _parser(schema, found, ("label", "id", "group", "md5"))
    cols: dict[str, list] = {"id": [], "label": [], "group": [], "md5": []}
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
    return pd.DataFrame(cols)
