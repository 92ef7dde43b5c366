"""Preparing one image for the records: decoding at a reduced DCT scale matches a
full decode on real photographs, EXIF orientation is applied, and grey, CMYK,
PNG, WEBP and progressive inputs come out as upright RGB of the target size."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from shopee_tpu.data.write.images import prepare_image, resized_image


def _photo_files() -> dict[str, bytes]:
    """Real camera photographs, as their original JPEG files (scikit-learn's and
    scikit-image's bundled samples): 640 x 427 up to 1411 x 1411 px."""
    import skimage.data
    import sklearn.datasets

    sk = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    paths = [os.path.join(sk, n) for n in ("china.jpg", "flower.jpg")]
    names = ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg")
    paths += [os.path.join(skimage.data.data_dir, n) for n in names]
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[os.path.basename(p)] = f.read()
    return out


def _pixels(img) -> np.ndarray:
    return np.asarray(img, np.float32)


def _error(a, b) -> float:
    """Mean absolute pixel difference, 0..255."""
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_reduced_dct_decoding_matches_a_full_decode_on_real_photographs():
    # Targets that make libjpeg decode at 1/2, 1/4 and 1/8 of each photo's size.
    errors, scales = [], set()
    for name, data in _photo_files().items():
        w, h = Image.open(io.BytesIO(data)).size
        for size in (200, 100, 50):
            scale = max(s for s in (1, 2, 4, 8) if min(w, h) // size >= s)
            if scale == 1:
                continue
            scales.add(scale)
            drafted = resized_image(data, size)
            full = resized_image(data, size, draft=False)
            assert drafted.size == full.size == (size, size)
            err = _error(drafted, full)
            assert 0 < err <= 6.0, (name, size, err)  # 0: no reduced decode ran
            errors.append(err)
    assert scales == {2, 4, 8} and len(errors) == 15
    # Measured: 1.64 on average, 5.2 at most (china.jpg at 1/8), about what
    # storing the image as a quality-95 JPEG costs on these photos (about 3).
    assert np.mean(errors) <= 2.0


def test_prepare_image_draft_output_is_the_stored_jpeg_of_the_drafted_pixels():
    data = _photo_files()["retina.jpg"]
    stored, size = prepare_image(data, image_size=224, quality=95)[:2]
    assert size == (224, 224)
    decoded = Image.open(io.BytesIO(stored))
    assert decoded.format == "JPEG" and decoded.mode == "RGB"
    # The stored JPEG is the drafted image, re-encoded at quality 95 (which
    # costs about 1.8 grey levels on this photo).
    assert _error(decoded, resized_image(data, 224)) < 2.5


# EXIF orientation -> how the upright picture was turned to be stored that way
# (the inverse of what a viewer applies).
_STORED = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


@pytest.mark.parametrize("resize", ["square", "longest"])
def test_exif_orientation_is_applied(resize):
    # An upright photo 640 x 427: stored turned, with the EXIF tag that says how.
    upright = Image.open(io.BytesIO(_photo_files()["china.jpg"])).convert("RGB")
    want = resized_image(_jpeg(upright), 100, resize)
    assert want.size == ((100, 100) if resize == "square" else (100, 67))
    # The wrong answers: the picture as stored, for each other orientation.
    turned = [want.transpose(ops[0]) for ops in _STORED.values()]
    wrong = [w for w in turned if w.size == want.size]
    for orientation, ops in _STORED.items():
        stored = upright
        for op in ops:
            stored = stored.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _jpeg(stored, exif=exif.tobytes())
        got = resized_image(data, 100, resize)
        out, size = prepare_image(data, image_size=100, resize=resize)[:2]
        assert got.size == size == want.size, orientation
        # Within re-encoding and drafting noise of the upright picture, and much
        # nearer to it than to any other orientation of it.
        for img in (got, Image.open(io.BytesIO(out))):
            err = _error(img, want)
            assert err < 5.0, orientation
            assert all(err < _error(img, w) / 3 for w in wrong), orientation


def test_only_upright_jpegs_of_the_target_size_are_kept_as_they_are():
    upright = Image.open(io.BytesIO(_photo_files()["flower.jpg"])).convert("RGB")
    square = upright.resize((64, 64), Image.BICUBIC)
    plain = _jpeg(square)
    assert prepare_image(plain, image_size=64) == (plain, (64, 64), 3, "JPEG")
    # The same pixels stored mirrored, with the tag that mirrors them back: the
    # reader ignores EXIF, so the writer stores the upright picture instead.
    exif = Image.Exif()
    exif[0x0112] = 2
    turned = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mirrored = _jpeg(turned, exif=exif)
    out, size = prepare_image(mirrored, image_size=64)[:2]
    assert out != mirrored and size == (64, 64)
    img = Image.open(io.BytesIO(out))
    assert _error(img, square) < min(5.0, _error(img, turned) / 3)


def test_grey_cmyk_png_webp_and_progressive_inputs_are_stored_as_jpeg():
    photo = Image.open(io.BytesIO(_photo_files()["rocket.jpg"])).convert("RGB")
    grey = photo.convert("L")
    rgba = photo.convert("RGBA")

    def encoded(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    cases = {
        "grey jpeg": (encoded(grey, "JPEG", quality=95), grey.convert("RGB")),
        "cmyk jpeg": (encoded(photo.convert("CMYK"), "JPEG", quality=95), photo),
        "progressive jpeg": (_jpeg(photo, progressive=True), photo),
        "png": (encoded(photo, "PNG"), photo),
        "grey png": (encoded(grey, "PNG"), grey.convert("RGB")),
        "rgba png": (encoded(rgba, "PNG"), photo),
        "palette png": (encoded(photo.quantize(256), "PNG"), photo),
        "webp": (encoded(photo, "WEBP", quality=95), photo),
    }
    for name, (data, source) in cases.items():
        out, size = prepare_image(data, image_size=80)[:2]
        img = Image.open(io.BytesIO(out))
        mode = "L" if name.startswith("grey") else "RGB"  # grey stays one channel
        assert (img.format, img.mode, img.size, size) == (
            "JPEG",
            mode,
            (80, 80),
            (80, 80),
        ), name
        expect = source.resize((80, 80), Image.BICUBIC)
        limit = 6.0 if name == "palette png" else 3.0  # 256 colours
        assert _error(img.convert("RGB"), expect) < limit, name
