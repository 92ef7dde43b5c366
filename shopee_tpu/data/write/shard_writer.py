"""Writing one shard: the work a writer process does (no TensorFlow, no pandas).

A shard is written to a hidden temporary name and renamed to
``<prefix>-NN-<count>.tfrec`` only once complete, so a killed run never leaves a
file that looks like a finished shard. Unusable images are skipped and returned
with the reason, never dropped silently.

A row's source is a file path, pixels in memory (``Pixels``: arrays, pixel CSVs,
idx files; encoded losslessly here, in the writer process) or a row its reader
already found unusable (``Unusable``: recorded as skipped like a corrupt image).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from shopee_tpu.data.tfrecord import RecordWriter, encode_example
from shopee_tpu.data.write.images import (
    BadImage,
    PreparedImage,
    prepare_image,
    prepare_pixels,
)

__all__ = [
    "ShardParams",
    "ShardWriter",
    "Pixels",
    "Unusable",
    "write_shard",
    "shard_name",
]


@dataclass(frozen=True)
class ShardParams:
    """Settings shared by every shard of one run."""

    out_dir: str
    prefix: str
    width: int  # digits of the shard number
    image_size: int | None
    resize: str
    quality: int


@dataclass(frozen=True)
class Pixels:
    """One image as uint8 pixels (``H x W`` or ``H x W x C``)."""

    array: object  # numpy.ndarray


@dataclass(frozen=True)
class Unusable:
    """A source row that holds no usable image; recorded as skipped, with why."""

    where: str
    reason: str


def shard_name(params: ShardParams, index: int, count: int) -> str:
    """The Kaggle-style file name, with the record count: ``train-03-5269.tfrec``."""
    return f"{params.prefix}-{index:0{params.width}d}-{count}.tfrec"


def temp_name(params: ShardParams, index: int) -> str:
    """The hidden name a shard has while being written."""
    return f".{params.prefix}-{index:0{params.width}d}.tfrec.tmp-{os.getpid()}"


class ShardWriter:
    """Writes one shard: checks and encodes images, counts classes and skips."""

    def __init__(self, params: ShardParams, index: int):
        self.params, self.index = params, index
        self.tmp = os.path.join(params.out_dir, temp_name(params, index))
        self.writer = RecordWriter(self.tmp)
        self.count = 0
        self.class_counts: dict[int, int] = {}
        self.skipped: list[dict] = []
        self.channels = 0  # the most any stored image has
        self.formats: dict[str, int] = {}

    def add(self, data: bytes, label: int, id_: str, group: str, where: str) -> None:
        """Adds one image (its original bytes); records a skip with the reason."""
        p = self.params
        try:
            image = prepare_image(
                data, image_size=p.image_size, resize=p.resize, quality=p.quality
            )
        except BadImage as e:
            self.skipped.append({"path": where, "reason": str(e)})
            return
        self.add_prepared(image, data, label, id_, group)

    def add_pixels(self, pixels, label: int, id_: str, group: str) -> None:
        """Adds one image held as uint8 pixels (stored losslessly when small)."""
        p = self.params
        image, png = prepare_pixels(
            pixels, image_size=p.image_size, resize=p.resize, quality=p.quality
        )
        self.add_prepared(image, png, label, id_, group)

    def add_prepared(
        self, image: PreparedImage, original: bytes, label: int, id_: str, group: str
    ) -> None:
        """Writes an image already prepared; ``original`` is what its MD5 is of."""
        self.channels = max(self.channels, image.channels)
        self.formats[image.format] = self.formats.get(image.format, 0) + 1
        example = {
            "image": image.data,
            "label": int(label),
            "id": id_,
            "group": group,
            "md5": hashlib.md5(original).hexdigest(),
        }
        self.writer.write(encode_example(example))
        self.count += 1
        self.class_counts[int(label)] = self.class_counts.get(int(label), 0) + 1

    def skip(self, where: str, reason: str) -> None:
        """Records an image that could not even be read."""
        self.skipped.append({"path": where, "reason": reason})

    def finish(self) -> dict:
        """Renames the complete file to its final name; returns the shard's result."""
        self.writer.close()
        name = None
        if self.count:
            name = shard_name(self.params, self.index, self.count)
            os.replace(self.tmp, os.path.join(self.params.out_dir, name))
        else:  # every image was skipped: no empty shard file
            os.remove(self.tmp)
        return {
            "index": self.index,
            "file": name,
            "count": self.count,
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            "skipped": self.skipped,
            "channels": self.channels,
            "formats": dict(sorted(self.formats.items())),
        }


def write_shard(
    task: tuple[ShardParams, int, list[tuple]],
    progress: Callable[[int], None] | None = None,
    *,
    interval: float = 0.25,
) -> dict:
    """Writes a shard: ``task = (params, index, [(source, label, id, group)])``,
    where ``source`` is a file path, ``Pixels`` or ``Unusable``.

    ``progress(n)`` is told about every ``n`` rows done (written or skipped), at most
    once per ``interval`` seconds and once at the end.
    """
    params, index, rows = task
    shard = ShardWriter(params, index)
    done, last = 0, time.monotonic()
    for source, label, id_, group in rows:
        if isinstance(source, Unusable):
            shard.skip(source.where, source.reason)
        elif isinstance(source, Pixels):
            shard.add_pixels(source.array, label, id_, group)
        else:
            _add_file(shard, source, label, id_, group)
        done += 1
        if progress is not None and time.monotonic() - last >= interval:
            progress(done)
            done, last = 0, time.monotonic()
    result = shard.finish()
    if progress is not None and done:
        progress(done)
    return result


def _add_file(shard: ShardWriter, path: str, label: int, id_: str, group: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        shard.skip(path, "missing file")
    except OSError as e:
        shard.skip(path, f"unreadable file ({type(e).__name__}: {e})")
    else:
        shard.add(data, label, id_, group, path)
