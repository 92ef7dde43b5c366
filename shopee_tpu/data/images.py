"""Checking, resizing and re-encoding one image for the record writer (Pillow).

Pillow comes with matplotlib, a core dependency, and starts in milliseconds, so the
writer's worker processes stay light (no TensorFlow). Every image is fully decoded
once here: a truncated or corrupt file is caught at write time and reported, rather
than failing a training run hours later.
"""

from __future__ import annotations

import io

__all__ = ["BadImage", "prepare_image", "RESIZE_MODES"]

RESIZE_MODES = ("square", "longest")


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


def prepare_image(
    data: bytes,
    *,
    image_size: int | None = None,
    resize: str = "square",
    quality: int = 95,
) -> tuple[bytes, tuple[int, int]]:
    """Checks one image and returns the JPEG bytes to store, with its (width, height).

    The original bytes are kept when they already are an RGB or greyscale JPEG of the
    wanted size; anything else (other formats, CMYK, other sizes) is re-encoded, since
    the reader decodes with ``tf.io.decode_jpeg``.

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
    from PIL import Image

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    img = _open(data)
    try:
        size = img.size
        target = size if image_size is None else _target(size, image_size, resize)
        keep = img.format == "JPEG" and img.mode in ("RGB", "L") and target == size
        if keep:
            # Decoding at 1/8 scale (JPEG DCT scaling) still reads every entropy-coded
            # segment, so truncation is detected at a fraction of the cost.
            img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
            return data, size
        if img.format == "JPEG" and target != size:
            img.draft("RGB", target)  # decode at the smallest DCT scale >= target
        img.load()
        img = img.convert("RGB")
        if img.size != target:
            img = img.resize(target, Image.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), target
    except BadImage:
        raise
    except Exception as e:  # truncated/corrupt data surfaces as OSError, SyntaxError...
        raise BadImage(
            f"corrupt or truncated image ({type(e).__name__}: {e})"
        ) from None
