"""Product aggregation, model ensembles, probability files and stacking."""

from __future__ import annotations

import numpy as np
import pytest

from shopee_tpu.inference.ensemble import (
    ProbFile,
    aggregate_products,
    combine_models,
    geometric_mean,
    load_probs,
    power_mean,
    save_probs,
)
from shopee_tpu.inference.stacking import LogisticStacker, concat_folds, fit_stacker

P = np.array(
    [
        [0.6, 0.3, 0.1],  # a
        [0.2, 0.5, 0.3],  # b
        [0.2, 0.7, 0.1],  # a
        [0.1, 0.1, 0.8],  # c
        [0.4, 0.4, 0.2],  # b
    ],
    np.float32,
)
G = ["a", "b", "a", "c", "b"]


def test_product_sum_and_mean():
    keys, summed = aggregate_products(G, P, "sum")
    assert keys.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(
        summed, [[0.8, 1.0, 0.2], [0.6, 0.9, 0.5], [0.1, 0.1, 0.8]], atol=1e-6
    )
    keys, mean = aggregate_products(G, P, "mean")
    np.testing.assert_allclose(
        mean, [[0.4, 0.5, 0.1], [0.3, 0.45, 0.25], [0.1, 0.1, 0.8]], atol=1e-6
    )


def test_product_geometric_and_first_appearance_order():
    keys, geo = aggregate_products(["z", "y", "z"], P[:3], "geometric")
    assert keys.tolist() == ["z", "y"]
    # z: sqrt(0.6*0.2)=0.34641, sqrt(0.3*0.7)=0.45826, sqrt(0.1*0.1)=0.1 -> / 0.90467
    np.testing.assert_allclose(
        geo[0], np.array([0.34641, 0.45826, 0.1]) / 0.90467, atol=1e-4
    )
    np.testing.assert_allclose(geo[1], P[1], atol=1e-6)
    with pytest.raises(ValueError, match="method must be"):
        aggregate_products(G, P, "median")


def test_geometric_mean_is_normalised_exp_mean_log():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=(3, 4))  # 3 models, 4 rows, 6 classes
    expected = np.exp(np.log(p).mean(0))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(geometric_mean(p, axis=0), expected, atol=1e-6)
    w = np.array([1.0, 2.0, 1.0])
    weighted = np.exp(np.tensordot(w / 4, np.log(p), axes=1))
    weighted /= weighted.sum(-1, keepdims=True)
    np.testing.assert_allclose(geometric_mean(p, 0, w), weighted, atol=1e-6)
    pm = power_mean(p, 0, power=0.5)
    ref = (np.sqrt(p).mean(0)) ** 2
    np.testing.assert_allclose(pm, ref / ref.sum(-1, keepdims=True), atol=1e-6)


def test_probability_files_round_trip_and_ensemble_by_id(tmp_path):
    ids = np.array(["x.jpg", "y.jpg", "z.jpg"])
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float32)
    b = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3]], np.float32)
    save_probs(tmp_path / "a.npz", ids, a, dtype="float16", meta={"run": "a"})
    # b saved in another row order, uint8-quantised
    save_probs(tmp_path / "b.npz", ids[::-1], b[::-1], dtype="uint8")
    fa, fb = load_probs(tmp_path / "a.npz"), load_probs(tmp_path / "b.npz")
    assert fa.meta == {"run": "a"} and fa.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(fa.probs, a, atol=1e-3)
    np.testing.assert_allclose(fb.probs[::-1], b, atol=0.5 / 255 + 1e-6)
    out_ids, mean = combine_models(
        [tmp_path / "a.npz", tmp_path / "b.npz"], weights=[3, 1]
    )
    assert out_ids.tolist() == ids.tolist()
    np.testing.assert_allclose(mean, 0.75 * a + 0.25 * b, atol=3e-3)
    _, geo = combine_models([a, b], method="geometric")
    assert geo[0, 2] < 1e-5  # a zero in one model all but vetoes the class
    missing = ProbFile(ids[:2], a[:2], {})
    with pytest.raises(ValueError, match=r"missing \['z.jpg'\]"):
        combine_models([fa, missing])


def _synthetic(n: int, seed: int):
    """Model A is good (true class boosted), model B is mostly noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    a = softmax(rng.normal(0, 1, (n, 4)) + 2.0 * np.eye(4)[y])
    b = softmax(2.0 * rng.normal(0, 1, (n, 4)) + 0.3 * np.eye(4)[y])
    return y, a, b


@pytest.mark.parametrize("kind", ["per_class", "full"])
def test_stacker_beats_the_plain_mean_when_one_model_is_better(kind, tmp_path):
    y, a, b = _synthetic(1200, seed=1)
    yt, at, bt = _synthetic(1200, seed=2)  # held-out "test"
    stacker = fit_stacker([a, b], y, kind=kind, steps=300)
    assert stacker.loss_history[-1] < stacker.loss_history[0]
    stacked = stacker.predict([at, bt])
    mean = (at + bt) / 2

    def nll(p):
        return -np.mean(np.log(p[np.arange(len(yt)), yt]))

    acc = lambda p: np.mean(p.argmax(1) == yt)  # noqa: E731
    assert acc(stacked) >= acc(mean)
    assert nll(stacked) < nll(mean) - 0.05
    if kind == "per_class":  # it learned to trust model A more
        assert stacker.weights[0].mean() > 2 * stacker.weights[1].mean()
    stacker.save(tmp_path / "s.npz")
    again = LogisticStacker.load(tmp_path / "s.npz")
    np.testing.assert_allclose(again.predict([at, bt]), stacked, atol=1e-6)


def test_concat_folds_rejects_an_id_in_two_folds():
    f1 = ProbFile(np.array(["a", "b"]), P[:2], {})
    f2 = ProbFile(np.array(["c"]), P[2:3], {})
    joined = concat_folds([f1, f2])
    assert joined.ids.tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"more than one fold: \['b'\]"):
        concat_folds([f1, ProbFile(np.array(["b"]), P[:1], {})])
