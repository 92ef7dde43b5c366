"""The JPEGs ``bench input`` reads: a folder of real photographs (``--images``), or a
synthetic set made from scikit-learn's two sample photos.

Real photographs that install offline on Debian and Ubuntu: ``mate-backgrounds``
(``/usr/share/backgrounds/mate``, 16 JPEGs of 1280-5640 px, most of them photos)
and ``plasma-workspace-wallpapers`` (``/usr/share/wallpapers``: 171 JPEG paths of
400-5120 px, 39 distinct files, the others symbolic links that name one file at
several screen sizes). ``--min-side`` keeps the large ones.
"""

from __future__ import annotations

import io
import os

import numpy as np

CLASSES = 10
SUFFIXES = (".jpg", ".jpeg")

__all__ = ["make_images", "find_jpegs", "class_layout", "corpus_facts"]


def make_images(out_dir: str, n: int = 1920, side: int = 500, seed: int = 0) -> str:
    """Writes ``n`` realistic JPEGs (about ``side`` px) into class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch = int(rng.integers(h // 2, h))
        cw = int(min(w, ch * rng.uniform(1.0, 1.5)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y : y + ch, x : x + cw].astype(np.float32)
        crop = np.clip(crop * rng.uniform(0.7, 1.3, size=3), 0, 255).astype(np.uint8)
        img = Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop)
        scale = side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)))
        folder = os.path.join(out_dir, f"c{i % CLASSES:02d}")
        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"img{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    return out_dir


def _short_side(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            return min(img.size)
    except Exception as e:  # Pillow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable image ({e})") from None


def find_jpegs(images: str, min_side: int = 0) -> tuple[list[tuple[str, str]], int]:
    """``(path, label)`` of every JPEG below ``images`` (recursively, symbolic
    links followed) whose shorter side is at least ``min_side`` px, and the count
    of smaller ones left out. The label is the first folder below ``images``
    (``all`` for files directly in it)."""
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: not a folder")
    found, small = [], 0
    for dirpath, dirnames, names in os.walk(images, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, images)
        label = "all" if rel == "." else rel.split(os.sep)[0]
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if not name.lower().endswith(SUFFIXES):
                continue
            if min_side and _short_side(path) < min_side:
                small += 1
                continue
            found.append((os.path.abspath(path), label))
    if not found:
        raise ValueError(
            f"--images {images}: no JPEG files"
            + (f" with a shorter side of {min_side} px or more" if min_side else "")
        )
    return found, small


def class_layout(rows: list[tuple[str, str]], out_dir: str):
    """Symlinks each ``(path, label)`` as ``out_dir/<label>/<n>-<name>`` (the
    layout ``image_dataset_from_directory`` reads); returns the table the record
    writer reads."""
    import pandas as pd

    for i, (src, label) in enumerate(rows):
        folder = os.path.join(out_dir, label)
        os.makedirs(folder, exist_ok=True)
        os.symlink(src, os.path.join(folder, f"{i:06d}-{os.path.basename(src)}"))
    return pd.DataFrame(rows, columns=["path", "label"])


def corpus_facts(rows: list[tuple[str, str]]) -> dict:
    """Sizes, bytes and encodings of the images used (headers only)."""
    from PIL import Image

    sides, progressive, oriented = [], 0, 0
    for path, _ in rows:
        with Image.open(path) as img:
            sides.append(img.size)
            progressive += bool(img.info.get("progressive"))
            oriented += img.getexif().get(0x0112, 1) != 1
    shorter = [min(s) for s in sides]
    longer = [max(s) for s in sides]
    return {
        "distinct_files": len({os.path.realpath(p) for p, _ in rows}),
        "classes": len({label for _, label in rows}),
        "shorter_side_px": [min(shorter), int(np.median(shorter)), max(shorter)],
        "longer_side_px": [min(longer), int(np.median(longer)), max(longer)],
        "megabytes_mean": round(
            float(np.mean([os.path.getsize(p) for p, _ in rows])) / 1e6, 3
        ),
        "progressive": progressive,
        "exif_rotated": oriented,
    }
