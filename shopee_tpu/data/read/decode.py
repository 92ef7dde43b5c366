"""Reading one record: parsing its features and decoding its image, the step the
training and evaluation pipelines share; and scanning ids and labels without
decoding a single image.

Images are decoded at the coarsest JPEG DCT scale (1, 1/2, 1/4, 1/8) that keeps the
short side at least the size asked, resized only when the size differs, and kept
uint8: a quarter of float32's memory traffic in ``tf.data``, and of the bytes sent
to the device, where the model casts them.

TensorFlow is imported with a plain statement (``tf()``), not importlib: autograph
converts every function a ``tf.data`` map calls, cannot convert
``importlib.import_module`` and warns for each traced function. These functions use
``tf.cond``/``tf.switch_case`` explicitly, so nothing is lost by skipping it
(``plain``).
"""

from __future__ import annotations

from collections.abc import Collection

from shopee_tpu.console import progress_bar
from shopee_tpu.data.manifests import manifests_of
from shopee_tpu.data.read.files import count_records, list_files
from shopee_tpu.data.schemas import Schema, check_features, get_schema, probe_features
from shopee_tpu.utils import require_tensorflow

__all__ = [
    "tf",
    "plain",
    "decode_image",
    "record_parser",
    "stored_exactly",
    "known_count",
    "id_filter",
    "made_id",
    "made_ids",
    "to_output",
    "read_ids_labels",
    "READ_BUFFER",
]

READ_BUFFER = 8 << 20  # bytes read ahead per file (GCS likes large reads)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libjpeg's accurate integer inverse DCT, which Pillow (hence prediction on plain
# files) and phone decoders use too: TensorFlow's default, the fast one, differs
# from it by up to ~17 levels a pixel. It decodes as fast on this CPU (measured).
DCT_METHOD = "INTEGER_ACCURATE"


def tf():
    """The ``tensorflow`` module, or an ImportError that says how to install it."""
    try:
        import tensorflow  # deferred: the framework, and only for tf.data
    except ImportError:
        return require_tensorflow()
    return tensorflow


def plain(fn):
    """Skips autograph: these functions use tf.cond/switch_case explicitly."""
    return tf().autograph.experimental.do_not_convert(fn)


def decode_image(jpeg, image_size: int, *, exact: bool = False):
    """JPEG or PNG bytes -> uint8 ``[image_size, image_size, 3]``.

    Grey images (one channel, as the writer stores them) become three equal
    channels here, the one place they are expanded: every registry model takes RGB,
    as pretrained weights do. ``decode_jpeg`` decodes PNG too (TensorFlow sniffs the
    format; the DCT ``ratio`` only applies to JPEG).

    Args:
        jpeg: Scalar string tensor.
        image_size: Output side.
        exact: The images are known to be ``image_size`` squares (our manifest
            says so): decode only.
    """
    t = tf()
    if exact:
        image = t.io.decode_jpeg(jpeg, channels=3, dct_method=DCT_METHOD)
        return t.ensure_shape(image, [image_size, image_size, 3])
    shape = _stored_shape(jpeg)
    short = t.minimum(shape[0], shape[1])
    index = t.reduce_sum(t.cast(short >= image_size * t.constant([2, 4, 8]), t.int32))
    branches = [
        (lambda r=r: t.io.decode_jpeg(jpeg, channels=3, ratio=r, dct_method=DCT_METHOD))
        for r in (1, 2, 4, 8)
    ]
    image = t.switch_case(index, branches)
    same = t.logical_and(
        t.shape(image)[0] == image_size, t.shape(image)[1] == image_size
    )
    image = t.cond(
        same,
        lambda: image,
        lambda: t.saturate_cast(
            t.round(t.image.resize(image, [image_size, image_size])), t.uint8
        ),
    )
    return t.ensure_shape(image, [image_size, image_size, 3])


def _stored_shape(data):
    """``[height, width]`` from a JPEG's or a PNG's header (PNG: IHDR's big-endian
    width and height at bytes 16..23)."""
    t = tf()
    png = t.equal(t.strings.substr(data, 0, 8), _PNG_SIGNATURE)

    def png_shape():
        wh = t.io.decode_raw(
            t.strings.substr(data, 16, 8), t.int32, little_endian=False
        )
        return t.reverse(t.reshape(wh, [2]), [0])

    return t.cond(png, png_shape, lambda: t.io.extract_jpeg_shape(data)[:2])


def stored_exactly(files: list[str], image_size: int) -> bool:
    """True when our manifests say every image is an ``image_size`` square."""
    manifests = manifests_of(files).values()
    return all(
        m.get("image_size") == image_size and m.get("resize") == "square"
        for m in manifests
    )


def known_count(files) -> int | None:
    """The record count from names or the manifest; None when only a scan could tell."""
    try:
        return count_records(files)
    except ValueError:
        return None


def record_parser(schema: Schema, found: dict[str, str], roles: tuple[str, ...]):
    """A function serialized record -> dict of the asked ``roles`` that exist.

    Roles: ``image``, ``label``, ``id``, ``group``, ``md5``. Parsing only what a
    mode needs saves a string copy per feature per image.
    """
    t = tf()
    kinds = {"bytes": t.string, "int64": t.int64, "float": t.float32}
    spec = {}
    for role in roles:
        name = getattr(schema, role)
        if name and name in found:
            spec[role] = (name, kinds[found[name]] if role == "label" else t.string)
    features = {name: t.io.FixedLenFeature([], dtype) for name, dtype in spec.values()}

    def parse(record):
        parsed = t.io.parse_single_example(record, features)
        out = {role: parsed[name] for role, (name, _) in spec.items()}
        if "label" in out:
            out["label"] = t.cast(out["label"], t.int32)
        return out

    return parse


def id_filter(keep_ids: Collection[str], schema: Schema, found, where: str):
    """A predicate on serialized records: is the record's id in ``keep_ids``?"""
    t = tf()
    if not (schema.id and schema.id in found):
        raise ValueError(
            f"{where}: selecting records by id (keep_ids) needs an id feature, and "
            f"these records have none for schema {schema.name!r}"
        )
    parse_id = record_parser(schema, found, ("id",))
    keys = sorted({str(k) for k in keep_ids})
    if not keys:
        return lambda record: t.constant(False)
    table = t.lookup.StaticHashTable(
        t.lookup.KeyValueTensorInitializer(
            t.constant(keys, t.string), t.ones(len(keys), t.int32)
        ),
        default_value=0,
    )
    return plain(lambda record: table.lookup(parse_id(record)["id"]) > 0)


def made_ids(path: str, start: int, n: int) -> list[str]:
    """The ids of records ``start .. start + n - 1`` of ``path`` when the records
    carry no id feature: ``<file name>:<index in the file>``."""
    base = path.rsplit("/", 1)[-1]
    return [f"{base}:{i}" for i in range(start, start + n)]


def made_id(path, index):
    """:func:`made_ids`'s rule inside a ``tf.data`` graph (``path`` and ``index``
    are tensors)."""
    t = tf()
    base = t.strings.split(path, "/")[-1]
    return t.strings.join([base, t.strings.as_string(index)], ":")


def to_output(images, value_range):
    """A batch of pixels (uint8, or float from augmentation) in 0..255 -> what the
    pipelines yield: uint8 for the model input contract's 0..255 (rounded and
    clipped), else float32 scaled to ``value_range``."""
    t = tf()
    lo, hi = value_range
    if (lo, hi) == (0, 255):
        if images.dtype == t.uint8:
            return images
        return t.saturate_cast(t.round(images), t.uint8)
    # Interpolating augmentations may overshoot 0..255 by a rounding error.
    images = t.clip_by_value(t.cast(images, "float32"), 0.0, 255.0)
    return images * ((hi - lo) / 255.0) + lo


def read_ids_labels(
    files_or_pattern, schema: str | Schema = "shopee_tpu", *, verbose: bool = False
):
    """Ids, labels, groups and MD5s of every record, without decoding images.

    The order equals the evaluation order of ``eval_dataset`` on the same files.
    Missing features give ``""`` (text) or ``-1`` (label); missing ids are made as
    the pipelines make them (``<file name>:<index>``). ``verbose`` shows a progress
    bar over the records.

    Returns:
        A pandas DataFrame with columns ``id, label, group, md5``.
    """
    import pandas as pd  # deferred: heavy, and only scans need it here

    t = tf()
    schema = get_schema(schema)
    files = list_files(files_or_pattern)
    found = probe_features(files[0])
    check_features(schema, found, files[0], need_label=False)
    parse = record_parser(schema, found, ("label", "id", "group", "md5"))
    cols: dict[str, list] = {"id": [], "label": [], "group": [], "md5": []}
    bar = progress_bar(
        known_count(files), "scan records", unit="rec", disable=not verbose
    )
    for path in files:
        ds = t.data.TFRecordDataset(path, buffer_size=READ_BUFFER).map(
            lambda r: parse(r) | {"_n": t.constant(0)}
        )
        start = 0
        for ex in ds.batch(4096).as_numpy_iterator():
            n = len(ex["_n"])
            for role in ("id", "group", "md5"):
                if role in ex:
                    cols[role].extend(v.decode("utf-8") for v in ex[role])
                elif role == "id":
                    cols["id"].extend(made_ids(path, start, n))
                else:
                    cols[role].extend([""] * n)
            cols["label"].extend(ex["label"].tolist() if "label" in ex else [-1] * n)
            start += n
            bar.update(n)
    bar.close()
    return pd.DataFrame(cols)
