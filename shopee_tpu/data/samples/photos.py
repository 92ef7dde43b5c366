"""A real-photograph classification task made at run time from bundled photos.

scikit-image and scikit-learn ship a handful of real photographs inside their wheels
(an astronaut, a cup of coffee, a cat, a rocket launch, the Hubble deep field, ...).
Each photograph becomes one class; the samples are random crops of it with scale,
position and flip jitter, resized to a small square, so telling the classes apart
means recognising a scene's colours and textures, not memorising pixels.

What makes the test set honest is *where* its crops come from: a band along one
edge of every photograph (``holdout`` of that side) is reserved for the test crops,
and no training crop touches it. The rest of the photograph is cut into ``tiles``;
every training crop lies inside one tile and carries the tile as its ``group``, so
a validation split by group (our record writer keeps each group in one shard) also
holds out whole regions, as the test set does.

The result is written in the Shopee competition layout, so every tool reads it::

    out/train.csv          filename,category,group
    out/test.csv           filename,category,group   (category: a placeholder)
    out/test_labels.csv    filename,category,group   (the held-out truth)
    out/train/train/train/NN/<md5>.jpg
    out/test/test/test/<md5>.jpg

``image_dataset_from_directory`` reads ``train/train/train`` as it is (one folder per
class), and :func:`prepare_photo_records` writes the TFRecords our pipeline reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pandas as pd

from shopee_tpu import fs
from shopee_tpu.data.write.records import write_records_from_csv

__all__ = [
    "PHOTOS",
    "load_photo",
    "make_photo_dataset",
    "prepare_photo_records",
    "TEST_PLACEHOLDER",
]

# Colour photographs first: the default 10 classes are all colour scenes. The
# grayscale ones (textures, a coin tray, the moon) extend the task to 16 classes.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble",
    "ihc",
    "retina",
    "motorcycle",
    "china",
    "flower",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)
TEST_PLACEHOLDER = "99"
_SIDES = ("left", "right", "top", "bottom")


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as RGB uint8 ``[h, w, 3]`` (no download, ever).

    Raises:
        ValueError: ``name`` is not one of ``PHOTOS``.
    """
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"), np.uint8)
    import skimage.data as data

    loaders = {
        "hubble": data.hubble_deep_field,
        "ihc": data.immunohistochemistry,
        "motorcycle": lambda: data.stereo_motorcycle()[0],
    }
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    image = np.asarray(loaders.get(name, getattr(data, name, None))())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _regions(h: int, w: int, side: str, holdout: float, tiles: tuple[int, int]):
    """``(test_box, train_tiles)`` as ``(y0, x0, y1, x1)`` boxes in pixels."""
    if side in ("left", "right"):
        cut = int(round(w * holdout))
        test = (0, 0, h, cut) if side == "left" else (0, w - cut, h, w)
        rest = (0, cut, h, w) if side == "left" else (0, 0, h, w - cut)
    else:
        cut = int(round(h * holdout))
        test = (0, 0, cut, w) if side == "top" else (h - cut, 0, h, w)
        rest = (cut, 0, h, w) if side == "top" else (0, 0, h - cut, w)
    y0, x0, y1, x1 = rest
    ny, nx = tiles
    ys = np.linspace(y0, y1, ny + 1).round().astype(int)
    xs = np.linspace(x0, x1, nx + 1).round().astype(int)
    boxes = [(ys[i], xs[j], ys[i + 1], xs[j + 1]) for i in range(ny) for j in range(nx)]
    return test, boxes


def _crop(photo, box, scale, size, rng, quality) -> bytes:
    """A random square crop inside ``box``, side ``scale`` x the photo's short side
    (clipped to fit), flipped half the time, resized to ``size``, as JPEG bytes.

    ``photo`` is a PIL image; the resize filters the whole box (antialiased).
    """
    from PIL import Image

    y0, x0, y1, x1 = box
    short = min(photo.size)
    side = rng.uniform(*scale) * short
    side = max(4.0, min(side, y1 - y0, x1 - x0))
    top = rng.uniform(y0, y1 - side)
    left = rng.uniform(x0, x1 - side)
    image = photo.resize(
        (size, size), Image.BILINEAR, box=(left, top, left + side, top + side)
    )
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photo_names(classes, holdout: float, scale) -> tuple[str, ...]:
    """The photographs of the task, once the settings are known to leave room for
    a crop.

    Raises:
        ValueError: A setting out of range (named).
    """
    names = PHOTOS[:classes] if isinstance(classes, int) else tuple(classes)
    if not 2 <= len(names) <= len(PHOTOS) or len(set(names)) != len(names):
        raise ValueError(
            f"classes: pick 2..{len(PHOTOS)} distinct photos, got {classes!r}"
        )
    if not 0.05 <= holdout <= 0.5:
        raise ValueError(f"holdout must be in [0.05, 0.5], got {holdout}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    return names


def _save_crop(photo, box, folder: str, rng, crop: dict) -> str:
    """Writes one crop inside ``box`` into ``folder`` as ``<md5>.jpg``; returns the
    file name. ``crop`` holds ``scale``, ``size`` and ``quality`` of :func:`_crop`."""
    blob = _crop(photo, box, crop["scale"], crop["size"], rng, crop["quality"])
    file = hashlib.md5(blob).hexdigest() + ".jpg"
    fs.write_bytes(os.path.join(folder, file), blob)
    return file


def _write_class(name, category, roots, counts, holdout, tiles, crop, rng):
    """Draws the held-out edge of photograph ``name`` and writes its crops: the
    training ones tile by tile, the test ones from the band along that edge.

    Returns:
        ``(edge, train_rows, test_rows)``.
    """
    from PIL import Image

    train_root, test_root = roots
    train_per_class, test_per_class = counts
    pixels = load_photo(name)
    photo = Image.fromarray(pixels)
    side = _SIDES[int(rng.integers(len(_SIDES)))]
    test_box, tile_boxes = _regions(*pixels.shape[:2], side, holdout, tiles)
    os.makedirs(os.path.join(train_root, category), exist_ok=True)
    os.makedirs(test_root, exist_ok=True)
    train_rows, test_rows = [], []
    for i in range(train_per_class):
        t = i % len(tile_boxes)
        folder = os.path.join(train_root, category)
        file = _save_crop(photo, tile_boxes[t], folder, rng, crop)
        train_rows.append((file, category, f"{name}-tile{t}"))
    for _ in range(test_per_class):
        file = _save_crop(photo, test_box, test_root, rng, crop)
        test_rows.append((file, category, f"{name}-test"))
    return side, train_rows, test_rows


def _write_tables(out_dir: str, train_rows, test_rows):
    """Writes the three CSVs (one row per distinct file); returns the train and
    truth tables and ``{"train_csv", "test_csv", "test_labels_csv"}`` paths."""
    cols = ["filename", "category", "group"]
    train = pd.DataFrame(train_rows, columns=cols).drop_duplicates("filename")
    truth = pd.DataFrame(test_rows, columns=cols).drop_duplicates("filename")
    test = truth.assign(category=TEST_PLACEHOLDER)
    paths = {
        "train_csv": os.path.join(out_dir, "train.csv"),
        "test_csv": os.path.join(out_dir, "test.csv"),
        "test_labels_csv": os.path.join(out_dir, "test_labels.csv"),
    }
    for key, table in zip(paths, (train, test, truth), strict=True):
        fs.write_text(paths[key], table.to_csv(index=False))
    return train, truth, paths


def make_photo_dataset(
    out_dir: str | os.PathLike,
    *,
    classes: int | tuple[str, ...] = 10,
    train_per_class: int = 120,
    test_per_class: int = 40,
    image_size: int = 64,
    scale: tuple[float, float] = (0.12, 0.28),
    holdout: float = 0.3,
    tiles: tuple[int, int] = (2, 2),
    quality: int = 95,
    seed: int = 0,
) -> dict:
    """Writes the photo task in the Shopee layout (see the module docstring).

    Args:
        out_dir: Folder to create.
        classes: How many of ``PHOTOS`` (the first ones), or their names.
        train_per_class: Training crops of each photograph.
        test_per_class: Test crops of each photograph, all from its held-out band.
        image_size: Side of the square JPEGs.
        scale: Range of the crop side as a fraction of the photograph's short side.
        holdout: Width of the test band, as a fraction of the side it runs along;
            which edge is drawn per photograph from ``seed``.
        tiles: Rows and columns of training regions (the crops' groups).
        quality: JPEG quality.
        seed: Seed for the edges, positions, scales and flips.

    Returns:
        A summary: counts, class names, the CSV paths and image roots.

    Raises:
        ValueError: A setting that leaves no room for a crop (named).
    """
    names = _photo_names(classes, holdout, scale)
    out_dir = os.fspath(out_dir)
    rng = np.random.default_rng(seed)
    train_root, test_root = (os.path.join(out_dir, d, d, d) for d in ("train", "test"))
    counts = (train_per_class, test_per_class)
    crop = {"scale": scale, "size": image_size, "quality": quality}
    train_rows, test_rows, edges = [], [], {}
    for k, name in enumerate(names):
        edges[name], train, test = _write_class(
            name, f"{k:02d}", (train_root, test_root), counts, holdout, tiles, crop, rng
        )
        train_rows += train
        test_rows += test
    train, truth, paths = _write_tables(out_dir, train_rows, test_rows)
    return {
        "root": out_dir,
        **paths,
        "train_images": train_root,
        "test_images": test_root,
        "train": len(train),
        "test": len(truth),
        "classes": len(names),
        "class_names": {f"{k:02d}": n for k, n in enumerate(names)},
        "holdout_edges": edges,
        "image_size": image_size,
        "seed": seed,
    }


def prepare_photo_records(
    out_dir: str | os.PathLike,
    *,
    shards: int = 8,
    workers: int | None = 1,
    **task,
) -> dict:
    """Makes the photo task (once) and its TFRecords: train, and labelled test.

    Rerunning with the same arguments reuses what is on disk; other arguments in
    the same folder are refused, so two tasks never mix.

    Args:
        out_dir: Folder for ``data/`` (the Shopee layout) and ``records/``.
        shards: Training shards (each holds whole tiles, so holding out shards
            holds out regions).
        workers: Writer processes.
        **task: Arguments of :func:`make_photo_dataset`.

    Returns:
        The summary of :func:`make_photo_dataset` plus ``train_records`` and
        ``test_records`` (labelled, with the training label map).
    """
    out_dir = os.fspath(out_dir)
    raw = os.path.join(out_dir, "data")
    summary_path = os.path.join(raw, "summary.json")
    wanted = json.loads(json.dumps(task))
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            info = json.load(f)
        if info.get("task") != wanted:
            raise ValueError(
                f"{out_dir} holds a photo task made with {info.get('task')}, not "
                f"{wanted}; use another folder"
            )
    else:
        info = {**make_photo_dataset(raw, **task), "task": wanted}
        fs.write_text(summary_path, json.dumps(info, indent=1))
    records = os.path.join(out_dir, "records")
    options = dict(
        image_size=None, resize="square", quality=95, workers=workers, seed=0
    )
    train_records = os.path.join(records, "train")
    write_records_from_csv(
        info["train_csv"], info["train_images"], train_records, shards=shards, **options
    )
    test_records = os.path.join(records, "test")
    write_records_from_csv(
        info["test_labels_csv"],
        info["test_images"],
        test_records,
        shards=1,
        label_map=os.path.join(train_records, "manifest.json"),
        **options,
    )
    return {**info, "train_records": train_records, "test_records": test_records}
