"""Feature layouts of TFRecord datasets: ours and the well-known Kaggle ones.

A :class:`Schema` names the features that hold the image, the label and the id. The
named schemas read published Kaggle datasets as they are:

=================== ================================ ===============================
name                labeled records                  unlabeled (test) records
=================== ================================ ===============================
``shopee_tpu``      image, label, id, group, md5     same, label -1
``flowers``         image, class, id                 image, id
``melanoma``        image, image_name, target, ...   image, image_name
``shopee-community`` image, label, one_hot_label     image, filename
=================== ================================ ===============================

The reader looks at the first record before building the pipeline, so a wrong
schema fails at once with the missing feature named, not deep inside ``tf.data``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shopee_tpu.utils import require_tensorflow

__all__ = ["Schema", "SCHEMAS", "get_schema", "probe_features", "check_features"]


@dataclass(frozen=True)
class Schema:
    """Names of the features a reader needs.

    Attributes:
        name: Name used in messages.
        image: JPEG bytes feature.
        label: Integer class feature (``None``: the layout has no labels).
        id: Image id/file name feature (``None``: ids are made from file and index).
        group: Product/group feature, if any.
        md5: MD5 feature, if any.
    """

    name: str
    image: str = "image"
    label: str | None = "label"
    id: str | None = "id"
    group: str | None = None
    md5: str | None = None

    def replace(self, **changes) -> Schema:
        """A copy with other feature names, e.g. ``SCHEMAS["flowers"].replace(label="y")``."""
        return dataclasses.replace(self, **changes)


SCHEMAS: dict[str, Schema] = {
    "shopee_tpu": Schema(
        "shopee_tpu", label="label", id="id", group="group", md5="md5"
    ),
    "flowers": Schema("flowers", label="class", id="id"),
    "melanoma": Schema("melanoma", label="target", id="image_name"),
    "shopee-community": Schema("shopee-community", label="label", id="filename"),
}


def get_schema(schema: str | Schema) -> Schema:
    """Returns a named schema, or ``schema`` itself when it already is one."""
    if isinstance(schema, Schema):
        return schema
    try:
        return SCHEMAS[schema]
    except KeyError:
        raise ValueError(
            f"unknown schema {schema!r}; named schemas: {', '.join(SCHEMAS)} "
            "(or pass a Schema with your feature names)"
        ) from None


def probe_features(path: str) -> dict[str, str]:
    """Feature names and kinds (``bytes``, ``int64``, ``float``) of a file's first record."""
    tf = require_tensorflow()
    for raw in tf.data.TFRecordDataset(path).take(1):
        example = tf.train.Example.FromString(raw.numpy())
        kinds = {}
        for name, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind") or "bytes_list"
            kinds[name] = kind.replace("_list", "")
        return kinds
    raise ValueError(f"{path} holds no records")


def check_features(
    schema: Schema, found: dict[str, str], path: str, *, need_label: bool
) -> None:
    """Raises ValueError naming a feature the schema needs but the records lack."""
    needed = [("image", schema.image)]
    if need_label:
        needed.append(("label", schema.label))
    for role, name in needed:
        if name is None or name not in found:
            shown = name if name is not None else f"(no {role} feature)"
            raise ValueError(
                f"{path}: records have no feature {shown!r}, which schema "
                f"{schema.name!r} reads as the {role}; features found: "
                f"{', '.join(sorted(found))}. Pass the matching schema= "
                f"({', '.join(SCHEMAS)}) or a Schema with your feature names."
            )
    if found[schema.image] != "bytes":
        raise ValueError(
            f"{path}: feature {schema.image!r} is {found[schema.image]}, expected "
            f"JPEG bytes (schema {schema.name!r})"
        )
