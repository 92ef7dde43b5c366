"""Every benchmark runs at its ``--quick`` size through the CLI and prints the JSON
keys the README names. Speed is never asserted: only that each figure is there,
is a finite positive number, and comes with its spread over the rounds."""

from __future__ import annotations

import json
import math

from shopee_tpu.cli import main


def _bench(capsys, what: str, *extra: str) -> dict:
    assert main(["bench", what, "--quick", "--json", "--rounds", "2", *extra]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["machine"]["cores"] >= 1
    assert len(out["machine"]["load_average"]) == 3
    return out


def _spread(fig: dict, rounds: int = 2) -> float:
    """A median/min/max/rounds figure; returns its median."""
    assert len(fig["rounds"]) == rounds
    assert all(math.isfinite(v) and v > 0 for v in fig["rounds"])
    assert fig["min"] <= fig["median"] <= fig["max"]
    return fig["median"]


def test_bench_predict_reports_both_groupings_and_the_chosen_one(capsys):
    out = _bench(capsys, "predict")
    assert out["device_kind"] == "cpu" and out["chosen"] == "per_view"
    assert out["views_per_call_chosen"] == 1
    ratio = out["ratio_chosen_over_k_single_median"]
    assert ratio == out["ratio_per_view_over_k_single_median"] > 0
    assert out["ratio_batched_over_k_single_median"] > 0
    for name in ("batched", "per_view"):
        _spread(out["ratios"][name])
    for name in ("batched", "per_view", "k_single"):
        _spread(out["seconds_per_round"][name])
    _spread(out["end_to_end_ratios"])
    for name in ("batched", "per_view"):
        _spread(out["cpu_seconds_ratios"][name])
    assert out["meets_target"] == (ratio <= 1.1)


def test_bench_input_reports_the_decode_limit_and_end_to_end(capsys):
    out = _bench(capsys, "input", "--seconds", "0.2")
    assert out["records"] == out["images"] == 64
    limit = out["decode_limit"]
    names = {
        "single_thread",
        "single_thread_uint8",
        "parallel_decode",
        "ours",
        "ours_no_augment",
        "ours_private_pool",
    }
    assert set(limit["images_per_sec"]) == set(limit["cores_used"]) == names
    for name in names:
        _spread(limit["images_per_sec"][name])
    for name in ("ours", "ours_no_augment", "ours_private_pool", "parallel_decode"):
        _spread(limit[f"{name}_over_cores_x_single_thread"])
    assert set(limit["per_cpu_second_over_single_thread"]) == names - {"single_thread"}
    goal = out["ours_over_cores_x_single_thread_median"]
    assert goal == limit["ours_over_cores_x_single_thread"]["median"]
    assert out["meets_target"] == (goal >= 0.85)

    e2e = out["end_to_end"]
    assert e2e["epochs"] == [1, 3, 10]
    # The same images on each side: 64 = 4 whole batches of 16.
    assert e2e["images_per_epoch"] == {"ours": 64, "directory": 64}
    for e in (1, 3, 10):
        for key in ("ours_write_plus_read_seconds", "directory_seconds"):
            _spread(e2e[f"epochs_{e}"][key])
        _spread(e2e[f"epochs_{e}"]["directory_over_ours"])
    # More epochs take longer on both sides.
    assert (
        e2e["epochs_10"]["directory_seconds"]["median"]
        > e2e["epochs_1"]["directory_seconds"]["median"]
    )
    _spread(e2e["writer_n_over_1"])
    be = out["break_even_epochs"]
    assert be is None or be > 0


def test_bench_train_reports_fraction_of_peak_on_both_backends(capsys):
    out = _bench(capsys, "train")
    assert out["replicas"] == {"tensorflow": 1, "jax": 1, "jax_8_devices": 8}
    assert out["forward_gflops_per_image"]["ours"] > 0
    for key in ("tensorflow", "tensorflow_keras_applications", "jax", "jax_8_devices"):
        _spread(out["img_per_sec"][key])
        assert 0 < _spread(out["fraction_of_peak"][key]) < 1
    for name in ("tensorflow", "jax", "jax_8_devices"):
        _spread(out["matmul_gflops_per_sec"][name])
    _spread(out["ours_over_keras_applications"])
    _spread(out["jax_8_devices_over_1"])
    assert "overhead" in out["note"] and "not TPU speed" in out["note"]


def test_forward_flops_counts_convolutions_and_dense_layers():
    """A hand-countable model: conv 3x3 (3 -> 4 channels) on 8x8 'same', depthwise
    3x3 on 8x8, then dense 4 -> 5 after pooling."""
    import keras

    from shopee_tpu.bench.train import forward_flops

    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.Dense(5)(y)
    model = keras.Model(x, y)
    conv = 8 * 8 * 3 * 3 * 3 * 4
    depthwise = 8 * 8 * 3 * 3 * 4
    dense = 4 * 5
    assert forward_flops(model) == 2 * (conv + depthwise + dense)
