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

How an image is stored: a JPEG that needs no change keeps its bytes. Any other
image is encoded, as uncompressed PNG when both sides are at most
``LOSSLESS_MAX_SIDE`` (64) pixels, so that a 28 x 28 Fashion-MNIST or a 32 x 32
CIFAR image reads back pixel for pixel, and as JPEG at ``quality`` above it. Grey
images stay one channel in either format; the reader expands them to the three
channels every model takes (``shopee_tpu.data.read.decode.decode_image``).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np

__all__ = [
    "BadImage",
    "PreparedImage",
    "prepare_image",
    "resized_image",
    "encode_pixels",
    "prepare_pixels",
    "RESIZE_MODES",
    "LOSSLESS_MAX_SIDE",
]

RESIZE_MODES = ("square", "longest")
LOSSLESS_MAX_SIDE = 64  # images stored at most this wide and high are PNG
_GREY_MODES = ("1", "L", "LA")  # stored as one channel ("L")


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


def _load_resized(img, image_size, resize: str, draft: bool, mode: str = "RGB"):
    """The decoded, upright image at its target size (see :func:`resized_image`),
    in ``mode``: ``"RGB"``, or ``"keep grey"`` (``"L"`` for grey sources)."""
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
    if mode == "keep grey":
        mode = "L" if img.mode in _GREY_MODES else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
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


class PreparedImage(NamedTuple):
    """The bytes to store and what they hold."""

    data: bytes
    size: tuple[int, int]  # (width, height)
    channels: int  # 1 (grey) or 3 (RGB)
    format: str  # "JPEG" or "PNG"


def prepare_image(
    data: bytes,
    *,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
) -> PreparedImage:
    """Checks one image and returns the bytes to store (see the module docstring).

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
        data, size = _guarded(lambda: _verify(img, data))
        return PreparedImage(data, size, _channels(img.mode), "JPEG")
    out = _guarded(
        lambda: _load_resized(img, image_size, resize, draft=True, mode="keep grey")
    )
    fmt = "PNG" if max(out.size) <= LOSSLESS_MAX_SIDE else "JPEG"
    # PNG without compression: it decodes about as fast as a small JPEG (a
    # compressed PNG's inflate step costs several times that), at about the raw
    # pixels' size, which at 64 px or less is still small.
    options = {"compress_level": 0} if fmt == "PNG" else {"quality": quality}
    buf = io.BytesIO()
    out.save(buf, format=fmt, **options)
    return PreparedImage(buf.getvalue(), out.size, _channels(out.mode), fmt)


def _channels(mode: str) -> int:
    return 1 if mode == "L" else 3


def encode_pixels(pixels) -> bytes:
    """PNG bytes (lossless) of one uint8 image: ``H x W``, ``H x W x 1`` (grey) or
    ``H x W x 3`` (RGB)."""
    from PIL import Image

    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"pixels must be uint8 H x W or H x W x 3, got {array.dtype} {array.shape}"
        )
    buf = io.BytesIO()
    image = Image.fromarray(array, "L" if array.ndim == 2 else "RGB")
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def prepare_pixels(
    pixels, *, image_size: int | None = None, resize: str = "square", quality: int = 95
) -> tuple[PreparedImage, bytes]:
    """One uint8 image in memory -> ``(what to store, its PNG encoding)``.

    The PNG is the image as given, losslessly: the "file" whose MD5 a record
    keeps. When it needs no resize and is small, it is also what is stored (no
    decode and re-encode); otherwise it goes through :func:`prepare_image`.
    """
    png = encode_pixels(pixels)
    h, w = np.shape(pixels)[:2]
    target = (w, h) if image_size is None else _target((w, h), image_size, resize)
    if target == (w, h) and max(target) <= LOSSLESS_MAX_SIDE:
        grey = np.ndim(pixels) == 2 or np.shape(pixels)[2] == 1
        return PreparedImage(png, target, 1 if grey else 3, "PNG"), png
    prepared = prepare_image(png, image_size=image_size, resize=resize, quality=quality)
    return prepared, png
