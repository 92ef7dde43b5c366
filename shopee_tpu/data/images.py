"""Checking, resizing and re-encoding one image for the record writer (Pillow).

Pillow comes with matplotlib, a core dependency, and starts in milliseconds, so the
writer's worker processes stay light (no TensorFlow). Every image is decoded once
here: a truncated or corrupt file is caught at write time and reported, rather
than failing a training run hours later.

A JPEG at least twice the target size is decoded at a reduced DCT scale (libjpeg's
1/2, 1/4 or 1/8, through ``Image.draft``): the largest reduction that keeps both
sides at or above the target, then resized with an antialiasing bicubic filter.
On real photographs this matches a full decode plus the same resize within two
grey levels of 255 on average, about what storing them as quality-95 JPEGs costs
(``tests/test_data_images.py``; docs/benchmarks.md). It saves the inverse DCT and
colour conversion of the pixels it drops, not the entropy decoding of the file,
which every reader pays in full: on progressive JPEGs that is most of the time.
EXIF orientation is applied, since ``tf.io.decode_jpeg`` ignores it.
"""

from __future__ import annotations

import io

__all__ = ["BadImage", "prepare_image", "resized_image", "RESIZE_MODES"]

RESIZE_MODES = ("square", "longest")

# EXIF orientation -> the transpose that makes the image upright (EXIF 2.3;
# the table of PIL.ImageOps.exif_transpose). 5-8 swap width and height.
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM"}
_UPRIGHT |= {5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_ORIENTATION = 0x0112


class BadImage(ValueError):
    """An image that cannot be used; the message is the reason stored in the manifest."""


def _open(data: bytes):
    from PIL import Image

    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises several types for unreadable data
        raise BadImage(f"not an image ({type(e).__name__}: {e})") from None
    return img


def _target(size: tuple[int, int], image_size: int, resize: str) -> tuple[int, int]:
    w, h = size
    if resize == "square":
        return image_size, image_size
    scale = image_size / max(w, h)
    if scale >= 1:  # "longest" never enlarges
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def _orientation(img) -> int:
    """The EXIF orientation (1..8), 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unusable
        return 1
    return value if value in _UPRIGHT else 1


def _guarded(fn):
    """Runs ``fn()``; decoding errors become :class:`BadImage`."""
    try:
        return fn()
    except BadImage:
        raise
    except Exception as e:  # truncated/corrupt data surfaces as OSError, SyntaxError...
        raise BadImage(
            f"corrupt or truncated image ({type(e).__name__}: {e})"
        ) from None


def _load_resized(img, image_size, resize: str, draft: bool):
    """The decoded, upright RGB image at its target size (see :func:`resized_image`)."""
    from PIL import Image

    orientation = _orientation(img)
    turn = orientation >= 5  # stored sideways: width and height swap
    size = img.size[::-1] if turn else img.size
    target = size if image_size is None else _target(size, image_size, resize)
    # The size to reach before turning upright, in the stored orientation.
    stored = target[::-1] if turn else target
    if draft and img.format == "JPEG" and stored != img.size:
        img.draft("RGB", stored)  # the largest DCT reduction still >= stored
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != stored:
        img = img.resize(stored, Image.BICUBIC, reducing_gap=3.0)
    if orientation != 1:
        img = img.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
    return img


def resized_image(
    data: bytes,
    image_size: int | None = None,
    resize: str = "square",
    *,
    draft: bool = True,
):
    """Decodes an image file to an upright RGB ``PIL.Image`` of the target size.

    Args:
        data: The image file's bytes (JPEG, PNG, WEBP, ... in any Pillow mode).
        image_size: Target side; ``None`` keeps the original size.
        resize: ``"square"`` or ``"longest"`` (see :func:`prepare_image`).
        draft: Decode a JPEG at a reduced DCT scale when it is at least twice the
            target; ``False`` always decodes at full size (the reference the
            tests compare against).

    Raises:
        BadImage: Empty, unreadable, truncated or corrupt data.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    img = _open(data)
    return _guarded(lambda: _load_resized(img, image_size, resize, draft))


def _verify(img, data: bytes):
    """Decodes ``img`` at 1/8 scale to check it: DCT scaling still reads every
    entropy-coded segment, so truncation is detected at a fraction of the cost."""
    size = img.size
    img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
    img.load()
    return data, size


def prepare_image(
    data: bytes,
    *,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
) -> tuple[bytes, tuple[int, int]]:
    """Checks one image and returns the JPEG bytes to store, with its (width, height).

    The original bytes are kept when they already are an upright RGB or greyscale
    JPEG of the wanted size; anything else (other formats, CMYK, other sizes, an
    EXIF rotation) is re-encoded, since the reader decodes with
    ``tf.io.decode_jpeg``, which ignores EXIF.

    Args:
        data: The image file's bytes.
        image_size: Target side; ``None`` keeps the original size.
        resize: ``"square"`` (exactly ``image_size`` x ``image_size``, aspect not
            kept, like the Kaggle TPU datasets) or ``"longest"`` (longest side
            ``image_size``, aspect kept, never enlarged).
        quality: JPEG quality of re-encoded images.

    Raises:
        BadImage: Empty, unreadable, truncated or corrupt data (the message says which).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    img = _open(data)
    keep = (
        img.format == "JPEG"
        and img.mode in ("RGB", "L")
        and (image_size is None or _target(img.size, image_size, resize) == img.size)
        and _orientation(img) == 1
    )
    if keep:
        return _guarded(lambda: _verify(img, data))
    out = _guarded(lambda: _load_resized(img, image_size, resize, draft=True))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), out.size
