"""The TTA report: per-view, per-reducer and cumulative accuracies, and its plot."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_inference_tta import CLASSES, _direct, _images, _model


def test_tta_report_matches_hand_computed_accuracies(tmp_path):
    import tensorflow as tf

    from shopee_tpu.inference.report import tta_report

    model, x = _model(seed=3), _images(40, seed=1)
    plain, flipped = _direct(model, x), _direct(model, x[:, :, ::-1].copy())
    rot = _direct(model, np.rot90(x, 2, axes=(1, 2)).copy())
    # Labels chosen so that views disagree: the plain view's answer for even rows,
    # the flipped view's answer for odd rows.
    y = np.where(np.arange(40) % 2 == 0, plain.argmax(1), flipped.argmax(1))
    ds = tf.data.Dataset.from_tensor_slices((x, np.eye(CLASSES)[y])).batch(16)

    df = tta_report(
        model, ds, ("identity", "flip_lr", "rot180"), path=tmp_path / "tta.png"
    )
    table = {(k, n): a for k, n, a in zip(df["kind"], df["name"], df["accuracy"])}
    acc = lambda p: float(np.mean(p.argmax(1) == y))  # noqa: E731
    geo = np.exp((np.log(plain) + np.log(flipped) + np.log(rot)) / 3)
    expected = {
        ("view", "identity"): acc(plain),
        ("view", "flip_lr"): acc(flipped),
        ("view", "rot180"): acc(rot),
        ("reducer", "mean"): acc(plain + flipped + rot),
        ("reducer", "geometric"): acc(geo),
        ("reducer", "beta"): acc(0.3 * plain + 0.35 * (flipped + rot)),
        ("cumulative", "identity+flip_lr"): acc(plain + flipped),
    }
    assert table == pytest.approx(expected, abs=1e-9)
    assert len(df) == len(expected) and set(df["images"]) == {40}
    assert df["delta"].iloc[0] == 0.0
    assert (tmp_path / "tta.png").stat().st_size > 1000


def test_tta_report_needs_labels():
    from shopee_tpu.inference.report import tta_report

    with pytest.raises(ValueError, match="needs labelled batches"):
        tta_report(_model(), [_images(2)], ("identity",))
