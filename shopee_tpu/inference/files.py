"""Prediction on plain image files: no records to write first.

``Classifier.from_run(RUN)`` (the run's Keras model) or ``Classifier.from_export
(DIR)`` (an exported ``model.tflite`` / ``model.onnx``, run without TensorFlow or
Keras) classifies image files, folders, a CSV of paths, or arrays, in batches and
with the run's TTA. What ``shopee-tpu predict --run RUN --images ...`` (or
``--model FILE``) calls.

Each file is read as the record writer reads it (``prepare_image``: checked,
squashed to the model's square with Pillow's bicubic filter, stored as JPEG) and
decoded with Pillow; the record pipeline decodes with the same accurate inverse
DCT, so a file gives the pixels, hence the prediction, of a record written from it
at the model's size (``shopee-tpu tfrecords --image-size SIZE``). A file that
cannot be read is named in one line and skipped, and the result counts it.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.data.write.images import BadImage, prepare_image
from shopee_tpu.data.write.sources import (
    IMAGE_SUFFIXES,
    class_names,
    normalise_table,
    read_table,
    resolve_paths,
)
from shopee_tpu.inference.exported import ExportedModel
from shopee_tpu.inference.run import load_run_model
from shopee_tpu.inference.submission import AUTO, FORMATS, write_image_submission
from shopee_tpu.inference.tta import predict
from shopee_tpu.inference.tta_views import (
    REDUCERS,
    ViewPlan,
    host_view_function,
    reduce_views,
)

__all__ = [
    "Classifier",
    "FilePredictions",
    "list_images",
    "predict_files",
    "read_image",
    "write_predictions",
]


def list_images(
    images: str | os.PathLike | Sequence, *, root: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """``(id, path)`` of every image named: files as given (the id is the path),
    folders searched recursively (ids relative to the folder, sorted) and CSVs
    with a path column (``path``/``filename``/``image``...; ids from an ``id``
    column, else the file name; paths relative to ``root``, default the CSV's
    folder, or found by name below it, as ``shopee-tpu tfrecords`` finds them).
    """
    items = [images] if isinstance(images, str | os.PathLike) else list(images)
    out: list[tuple[str, str]] = []
    for item in map(os.fspath, items):
        if os.path.isdir(item):
            for folder, dirs, names in os.walk(item):
                dirs.sort()
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_SUFFIXES):
                        path = os.path.join(folder, name)
                        rel = os.path.relpath(path, item).replace(os.sep, "/")
                        out.append((rel, path))
        elif item.lower().endswith(".csv"):
            table = normalise_table(read_table(item), test=True, where=item)
            base = os.fspath(root) if root else os.path.dirname(item) or "."
            table = resolve_paths(table, base)
            out.extend(zip(table["id"], table["path"], strict=True))
        else:
            out.append((item, item))
    if not out:
        raise FileNotFoundError(f"{images}: no images found")
    return out


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file -> uint8 ``[image_size, image_size, 3]``, as a record of it.

    Raises:
        BadImage: The file is missing, empty, not an image or corrupt.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"cannot read ({e.strerror or e})") from None
    stored = prepare_image(data, image_size=image_size, resize="square").data
    return np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))


def _from_array(image, image_size: int) -> np.ndarray:
    """An RGB (or greyscale) array in 0..255 at the model's size."""
    from PIL import Image

    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"an image array must be [h, w, 3], got {list(x.shape)}")
    if x.shape[:2] == (image_size, image_size):
        return x
    pil = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    size = (image_size, image_size)
    return np.asarray(pil.resize(size, Image.BICUBIC, reducing_gap=3.0))


@dataclass
class FilePredictions:
    """Probabilities of the images that could be read, and those skipped."""

    ids: list[str]
    probs: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(-1)]

    def frame(self):
        """``path, category, probability`` (the top class and its probability)."""
        df = pd.DataFrame(
            {
                "path": self.ids,
                "category": self.categories,
                "probability": self.probs.max(-1).round(6) if len(self.ids) else [],
            }
        )
        df.attrs["summary"] = {"images": len(self.ids), "skipped": len(self.skipped)}
        return df


class Classifier:
    """Classifies images with a run's model or an exported one, with TTA.

    Build one with ``Classifier.from_run`` or ``Classifier.from_export``.
    """

    def __init__(self, model, classes, image_size, tta, reduce, beta, source):
        if reduce not in REDUCERS:
            raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
        self.model, self.classes = model, list(classes)
        self.image_size, self.source = int(image_size), source
        self.plan, self.reduce, self.beta = ViewPlan.parse(tta), reduce, beta
        self.tta = self.plan.names

    def __repr__(self) -> str:
        return (
            f"Classifier({self.source!r}, {self.image_size} px, "
            f"{len(self.classes)} classes, tta={list(self.tta)})"
        )

    @classmethod
    def from_run(cls, run, *, weights: str = "best", tta=None, reduce=None):
        """The run's Keras model (Keras and TensorFlow or JAX)."""
        model, config, label_map, size = load_run_model(run, weights=weights)
        return cls(
            model,
            class_names(label_map),
            size,
            tta or config.predict.tta,
            reduce or config.predict.reduce,
            config.predict.beta,
            os.fspath(run),
        )

    @classmethod
    def from_export(cls, path, *, threads: int | None = None, tta=None, reduce=None):
        """An exported model (``shopee-tpu export``): LiteRT and ONNX run with
        neither TensorFlow nor Keras; the TTA is the run's, from ``model.json``."""
        model = ExportedModel(path, threads=threads)
        c = model.contract
        return cls(
            model,
            model.classes,
            model.image_size,
            tta or c.get("tta") or ("identity",),
            reduce or c.get("reduce") or "mean",
            c.get("beta", 0.3),
            model.path,
        )

    def _batches(self, items, batch_size, skipped) -> Iterator[tuple[np.ndarray, list]]:
        images, ids = [], []
        for key, item in items:
            try:
                if isinstance(item, str | os.PathLike):
                    image = read_image(item, self.image_size)
                else:
                    image = _from_array(item, self.image_size)
            except BadImage as e:
                print(f"{item}: {e}; skipped", file=sys.stderr)
                skipped.append((str(key), str(e)))
                continue
            images.append(image)
            ids.append(key)
            if len(images) == batch_size:
                yield np.stack(images), ids
                images, ids = [], []
        if images:
            yield np.stack(images), ids

    def _probs(self, batches: Iterator) -> tuple[list, np.ndarray]:
        ids, probs = [], []
        first = next(batches, None)
        if first is None:  # nothing could be read
            return [], np.zeros((0, len(self.classes)), np.float32)
        batches = itertools.chain([first], batches)
        if isinstance(self.model, ExportedModel):
            views = [host_view_function(m) for m in self.plan.members]
            for images, keys in batches:
                x = images.astype(np.float32)
                members = np.stack([self.model(view(x)) for view in views], axis=1)
                probs.append(reduce_views(members, self.plan, self.reduce, self.beta))
                ids.extend(keys)
        else:
            keys: list = []

            def images_only():
                for images, batch_ids in batches:
                    keys.extend(batch_ids)
                    yield images

            _, p = predict(
                self.model, images_only(), self.plan.names, self.reduce, self.beta
            )
            return keys, p
        return ids, np.concatenate(probs)

    def predict(self, images, *, batch_size: int = 32, root=None) -> FilePredictions:
        """Probabilities of image files, folders, a CSV of paths, or arrays.

        Args:
            images: A path (file, folder or CSV), a list of paths, one array
                ``[h, w, 3]`` or a list of them, or a batch ``[n, h, w, 3]``;
                pixels in 0..255, resized to the model's square if need be.
            batch_size: Images per model call.
            root: Where a CSV's relative paths start (default: its folder).

        Returns:
            ``FilePredictions``: ids (paths as named, or array indices), float32
            probabilities with the run's TTA, and the skipped files with why.
        """
        if isinstance(images, np.ndarray) and images.ndim in (3, 4):
            images = [images] if images.ndim == 3 else list(images)
        if isinstance(images, list | tuple) and images and not _is_path(images[0]):
            items = [(str(i), x) for i, x in enumerate(images)]
        else:
            items = list_images(images, root=root)
        skipped: list[tuple[str, str]] = []
        ids, probs = self._probs(self._batches(items, batch_size, skipped))
        return FilePredictions([str(i) for i in ids], probs, self.classes, skipped)


def _is_path(item) -> bool:
    return isinstance(item, str | os.PathLike)


def write_predictions(
    result: FilePredictions,
    out: str,
    format: str = AUTO,
    *,
    probability: bool = False,
    expected=None,
):
    """Writes ``path,category,probability`` (``auto``) or a submission in one of
    ``submission.FORMATS``' one-row-per-image formats, named by file name."""
    if format == AUTO:
        df = result.frame()
        fs.write_text(out, df.to_csv(index=False, lineterminator="\n"))
        return df
    ids, probs = list(result.ids), result.probs
    if not ids:
        raise ValueError(f"{out}: no image could be read; nothing to submit")
    if result.skipped:
        # A submission needs every id: an unreadable image gets the mean
        # prediction of the others (the test set's likeliest class).
        prior = probs.mean(axis=0, keepdims=True) if len(probs) else None
        ids += [k for k, _ in result.skipped]
        probs = np.concatenate([probs, np.repeat(prior, len(result.skipped), 0)])
    names = [os.path.basename(i) for i in ids]
    label_map = {c: i for i, c in enumerate(result.classes)}
    df = write_image_submission(
        out,
        names,
        probs,
        label_map,
        format=format,
        probability=probability,
        expected=expected,
    )
    df.attrs["summary"] = {"images": len(result.ids), "skipped": len(result.skipped)}
    return df


def predict_files(
    images,
    *,
    run=None,
    model=None,
    out: str | os.PathLike = "predictions.csv",
    format: str = AUTO,
    probability: bool = False,
    tta=None,
    reduce: str | None = None,
    batch_size: int = 32,
    root=None,
    expected=None,
    weights: str = "best",
    threads: int | None = None,
    verbose: bool = True,
):
    """Classifies image files and writes them (``shopee-tpu predict --images``).

    Args:
        images: Files, folders or a CSV of paths (see ``list_images``).
        run: A training run folder (its Keras model), or
        model: an exported ``model.tflite`` / ``model.onnx`` / folder (neither
            TensorFlow nor Keras is imported for LiteRT and ONNX).
        out: The CSV to write.
        format: ``auto`` (``path,category,probability``, not a submission) or
            a one-row-per-image submission format (``shopee``, ``named``:
            validated, named by file name; an unreadable image gets the mean
            prediction, so every id has a row).
        probability: ``named``: add the probability column.
        tta, reduce: Default: the run's (an export keeps them in ``model.json``).
        batch_size: Images per model call.
        root: Where a CSV's relative paths start.
        expected: ``shopee``: ids that must each appear once (``test.csv``).
        weights: ``best`` or ``last`` (``run``).
        threads: CPU threads of the exported model's runtime.
        verbose: Print a summary line.

    Returns:
        The written frame; ``df.attrs["summary"]`` counts images and skipped files.
    """
    if (run is None) == (model is None):
        raise ValueError("predict on images needs --run RUN or --model FILE (one)")
    if format != AUTO and (format not in FORMATS or FORMATS[format].per_product):
        per_image = [f for f, v in FORMATS.items() if not v.per_product]
        raise ValueError(
            f"--images writes auto (path,category,probability) or one of "
            f"{', '.join(per_image)}, not {format!r}"
        )
    if model is not None:
        classifier = Classifier.from_export(
            model, threads=threads, tta=tta, reduce=reduce
        )
    else:
        classifier = Classifier.from_run(run, weights=weights, tta=tta, reduce=reduce)
    result = classifier.predict(images, batch_size=batch_size, root=root)
    df = write_predictions(
        result, os.fspath(out), format, probability=probability, expected=expected
    )
    if verbose:
        print(
            f"{out}: {len(result.ids)} images predicted with {classifier.source} "
            f"(tta {','.join(classifier.tta)}), {len(result.skipped)} skipped"
        )
    return df
