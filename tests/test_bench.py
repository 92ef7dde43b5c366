"""Every benchmark runs once at its ``--quick`` size through the CLI. Speed is never
asserted; the figures are: each reported ratio, fraction and gain is recomputed
from the rounds (or runs) the JSON carries, so an inverted ratio or a wrong
formula fails, and each verdict follows from its figure."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from shopee_tpu.cli import main


def _bench(capsys, what: str, *extra: str) -> dict:
    assert main(["bench", what, "--quick", "--json", *extra]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["machine"]["cores"] >= 1
    assert len(out["machine"]["load_average"]) == 3
    return out


def _rounds(fig: dict, digits: int, rounds: int = 2) -> list[float]:
    """A median/min/max/rounds figure reported to ``digits`` decimals: its rounds,
    checked against its summary."""
    values = fig["rounds"]
    assert len(values) == rounds
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert (fig["min"], fig["max"]) == (min(values), max(values))
    # The median of the unrounded rounds, rounded: within one unit of the last
    # digit of the median of the rounded ones.
    assert abs(fig["median"] - statistics.median(values)) <= 10.0**-digits + 1e-12
    return values


def _is_product(fig: dict, digits: int, *factors) -> None:
    """Each round of ``fig`` (``digits`` decimals) is the product of the factors'
    rounds, each factor ``(rounds, power, decimals or None when exact)``, within
    what the rounding of every figure allows."""
    for i, got in enumerate(_rounds(fig, digits, len(factors[0][0]))):
        want, rel = 1.0, 0.0
        for rounds, power, decimals in factors:
            value = rounds[i]
            want *= value**power
            if decimals is not None:
                rel += abs(power) * 0.5 * 10.0**-decimals / abs(value)
        slack = abs(want) * rel * 1.01 + 0.5 * 10.0**-digits + 1e-12
        assert abs(got - want) <= slack, (i, got, want)


@pytest.mark.slow
def test_bench_predict_ratios_are_the_rounds_quotients(capsys):
    out = _bench(capsys, "predict", "--rounds", "2")
    assert out["device_kind"] == "cpu" and out["chosen"] == "per_view"
    assert out["views_per_call_chosen"] == 1
    secs, cpu = out["seconds_per_round"], out["cpu_seconds_per_round"]
    single = _rounds(secs["k_single"], 3)
    for name in ("batched", "per_view"):
        _is_product(
            out["ratios"][name], 4, (_rounds(secs[name], 3), 1, 3), (single, -1, 3)
        )
        _is_product(
            out["cpu_seconds_ratios"][name],
            4,
            (_rounds(cpu[name], 3), 1, 3),
            (_rounds(cpu["k_single"], 3), -1, 3),
        )
        median = out[f"ratio_{name}_over_k_single_median"]
        assert median == out["ratios"][name]["median"]
    ratio = out["ratio_chosen_over_k_single_median"]
    assert ratio == out["ratio_per_view_over_k_single_median"]
    e2e = out["end_to_end_seconds"]
    _is_product(
        out["end_to_end_ratios"],
        4,
        (_rounds(e2e["chosen"], 3), 1, 3),
        (_rounds(e2e["k_passes"], 3), -1, 3),
    )
    # K views of every image over the median time of K one-view passes (that
    # median reported to 3 decimals, the rate to 2).
    views, median = out["k"] * out["images"], secs["k_single"]["median"]
    low, high = views / (median + 5e-4) - 0.005, views / (median - 5e-4) + 0.005
    assert low <= out["images_per_sec_one_view_median"] <= high
    assert out["meets_target"] == (ratio <= 1.1)


@pytest.mark.slow
def test_bench_input_ratios_and_break_even_follow_from_the_rounds(capsys):
    out = _bench(capsys, "input", "--rounds", "2", "--seconds", "0.2")
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
    rates, used = limit["images_per_sec"], limit["cores_used"]
    assert set(rates) == set(used) == names
    single, cores = _rounds(rates["single_thread"], 1), out["cores"]
    for name in ("ours", "ours_no_augment", "ours_private_pool", "parallel_decode"):
        _is_product(
            limit[f"{name}_over_cores_x_single_thread"],
            3,
            (_rounds(rates[name], 1), 1, 1),
            ([cores, cores], -1, None),
            (single, -1, 1),
        )
    work = limit["per_cpu_second_over_single_thread"]
    assert set(work) == names - {"single_thread"}
    for name in work:  # (images / CPU second) over the single thread's
        _is_product(
            work[name],
            3,
            (_rounds(rates[name], 1), 1, 1),
            (_rounds(used[name], 2), -1, 2),
            (single, -1, 1),
            (_rounds(used["single_thread"], 2), 1, 2),
        )
    goal = out["ours_over_cores_x_single_thread_median"]
    assert goal == limit["ours_over_cores_x_single_thread"]["median"]
    assert out["meets_target"] == (goal >= 0.85)

    e2e = out["end_to_end"]
    assert e2e["epochs"] == [1, 3, 10]
    # The same images on each side: 64 = 4 whole batches of 16.
    assert e2e["images_per_epoch"] == {"ours": 64, "directory": 64}
    write = _rounds(e2e["write_seconds"], 3)
    for e in (1, 3, 10):
        fig = e2e[f"epochs_{e}"]
        ours = _rounds(fig["ours_write_plus_read_seconds"], 3)
        directory = _rounds(fig["directory_seconds"], 3)
        _is_product(fig["directory_over_ours"], 3, (directory, 1, 3), (ours, -1, 3))
        assert all(o > w for o, w in zip(ours, write))  # ours includes the write
    # More epochs take longer on both sides.
    assert (
        e2e["epochs_10"]["directory_seconds"]["median"]
        > e2e["epochs_1"]["directory_seconds"]["median"]
    )
    _is_product(
        e2e["writer_n_over_1"],
        3,
        (_rounds(e2e["write_1_process_seconds"], 3), 1, 3),
        (write, -1, 3),
    )
    # Write once, then save (directory - ours) seconds an epoch.
    per_epoch = e2e["seconds_per_epoch"]
    saved = per_epoch["directory"] - per_epoch["ours"]
    be = out["break_even_epochs"]
    assert be == e2e["break_even_epochs"]
    if saved > 0:
        assert be == round(e2e["write_seconds"]["median"] / saved, 2)
    else:
        assert be is None


@pytest.mark.slow
def test_bench_train_fractions_and_ratios_follow_from_the_rounds(capsys):
    out = _bench(capsys, "train", "--rounds", "2")
    assert out["model"] == "tiny-cnn"
    assert out["replicas"] == {"tensorflow": 1, "jax": 1, "jax_8_devices": 8}
    flops = out["forward_flops_per_image"]
    assert flops["ours"] > 0 and flops["plain"] > flops["ours"]
    img, matmul = out["img_per_sec"], out["matmul_gflops_per_sec"]
    # The machine's peak of each round: the best matmul of any worker.
    peaks = [max(r) for r in zip(*(_rounds(matmul[n], 1) for n in matmul))]
    for key in img:
        per_image = 3 * flops["plain" if "keras" in key else "ours"] / 1e9
        _is_product(
            out["fraction_of_peak"][key],
            5,
            (_rounds(img[key], 2), 1, 2),
            ([per_image, per_image], 1, None),
            (peaks, -1, 1),
        )
        assert 0 < out["fraction_of_peak"][key]["median"] < 1
    tf = _rounds(img["tensorflow"], 2)
    plain = _rounds(img["tensorflow_keras_applications"], 2)
    jax1, jax8 = _rounds(img["jax"], 2), _rounds(img["jax_8_devices"], 2)
    _is_product(out["ours_over_keras_applications"], 3, (tf, 1, 2), (plain, -1, 2))
    _is_product(out["jax_over_tensorflow"], 3, (jax1, 1, 2), (tf, -1, 2))
    _is_product(out["jax_8_devices_over_1"], 3, (jax8, 1, 2), (jax1, -1, 2))
    # uint8 pixels against the same pixels sent as float32: a quarter of the
    # image bytes a step (8 images of 32 x 32 x 3, plus 8 x 10 float32 labels).
    assert out["bytes_to_device_per_step"] == {"uint8": 24896, "float32": 98624}
    jax8_float = _rounds(img["jax_8_devices_float32"], 2)
    _is_product(
        out["jax_8_devices_uint8_over_float32"], 3, (jax8, 1, 2), (jax8_float, -1, 2)
    )
    assert "overhead" in out["note"] and "not TPU speed" in out["note"]


@pytest.mark.slow
def test_bench_cdiscount_throughput_and_memory_ratios(capsys):
    out = _bench(capsys, "cdiscount")
    assert (out["quick"], out["products"], out["rounds"]) == (True, 100, 2)
    through = out["throughput"]
    one, many = (_rounds_list(through[k]["rounds"]) for k in ("workers_1", "workers_n"))
    for name, rounds in (("workers_1", one), ("workers_n", many)):
        assert through[name]["products_per_sec"] == pytest.approx(
            statistics.median(rounds), abs=0.1
        )
        per_product = out["images"] / out["products"]
        assert through[name]["images_per_sec"] == pytest.approx(
            through[name]["products_per_sec"] * per_product, rel=2e-3, abs=0.2
        )
    n_over_1 = statistics.median(a / b for a, b in zip(many, one, strict=True))
    assert out["n_over_1"] == pytest.approx(n_over_1, rel=5e-3)
    rss = out["peak_rss"]
    small, large = rss["products_100"], rss["products_1000"]
    assert large["images"] > 5 * small["images"]
    for key in ("parent_mb", "worker_mb"):
        assert rss["ratio_10x_over_1x"][key] == pytest.approx(
            large[key] / small[key], abs=2e-3
        )
    assert out["rss_target_met"] == (max(rss["ratio_10x_over_1x"].values()) <= 1.2)


def _rounds_list(values: list[float]) -> list[float]:
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    return values


@pytest.mark.slow
def test_bench_ablation_changes_are_each_variant_minus_the_preset(capsys, tmp_path):
    out = _bench(capsys, "ablation", "--seed", "1", "--out", str(tmp_path))
    assert (out["benchmark"], out["quick"], out["seed"]) == ("ablation", True, 1)
    rows = out["rows"]
    assert [r["variant"] for r in rows] == ["photo preset", "no progressive resizing"]
    assert rows[1]["sets"] == ["plan.sizes="] and rows[0]["sets"] == []
    base = rows[0]["test_accuracy"]
    for row in rows:
        assert 0 <= row["test_accuracy"] <= 1 and row["epochs"] == 1
        assert row["change_vs_preset"] == round(row["test_accuracy"] - base, 4)


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


# bench accuracy: ours against the peer on the photo task. The quick runs check the
# figures (each recomputed from the runs it reports), the conditions (the same
# images, the same budget, the order) and what each side did with its budget.


def _same_images(task_root, out_dir: str) -> None:
    """The peer's folder and ours' records hold the same training crops."""
    import os

    import pandas as pd

    from shopee_tpu.data.pipeline import read_ids_labels

    listed = set(pd.read_csv(f"{task_root}/train.csv", dtype=str).filename)
    folder = {
        f for _, _, files in os.walk(f"{task_root}/train/train/train") for f in files
    }
    ids = read_ids_labels(f"{out_dir}/records/train")
    assert folder == listed == {os.path.basename(str(i)) for i in ids["id"]}


def _check_accuracy_run(r: dict, budget: float, margin: float) -> None:
    peer, ours = r["peer"], r["ours"]
    for side in (peer, ours):
        assert 0 <= side["test_accuracy"] <= 1
        assert side["within_budget"] == (side["wall_time_sec"] <= budget * (1 + margin))
    # The peer's flip TTA counts (chosen on the tuning split), whatever the test says.
    assert r["peer_accuracy"] == peer["test_accuracy_flip_tta"]
    assert r["gain"] == round(ours["test_accuracy"] - peer["test_accuracy_flip_tta"], 4)
    ratio = ours["wall_time_sec"] / peer["wall_time_sec"]  # walls to 0.1 s
    slack = ratio * 0.05 * (1 / ours["wall_time_sec"] + 1 / peer["wall_time_sec"])
    assert abs(r["time_ratio"] - ratio) <= slack + 5e-4
    # The order ran as reported: the second started after the first had ended.
    first, second = (r[name] for name in r["order"])
    assert first["started_sec"] == 0
    assert second["started_sec"] >= first["wall_time_sec"] - 0.1
    # Each side's time covers its prediction; ours' training got what was left.
    assert peer["after_training_sec"] <= peer["wall_time_sec"]
    parts = ours["records_sec"] + ours["train_sec"] + ours["predict_sec"]
    assert abs(parts - ours["wall_time_sec"]) <= 0.2
    reserve = r["reserve_sec"]["ours"]
    want = budget - reserve - ours["records_sec"]
    assert abs(ours["train_time_limit_sec"] - want) <= 0.15
    assert ours["train_images"] == peer["train_images"]


def _check_summary(setting: dict) -> None:
    runs = setting["runs"]
    for key, values in {
        "peer_accuracy": [r["peer_accuracy"] for r in runs],
        "ours_accuracy": [r["ours"]["test_accuracy"] for r in runs],
        "gain": [r["gain"] for r in runs],
        "time_ratio": [r["time_ratio"] for r in runs],
    }.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        want = {"mean": round(statistics.fmean(values), 4), "std": round(sd, 4)}
        assert setting[key] == want, key
    kept = [r[s]["within_budget"] for r in runs for s in ("peer", "ours")]
    assert setting["all_within_budget"] == all(kept)


@pytest.mark.slow
def test_bench_accuracy_quick_both_settings_figures_follow_from_the_runs(
    capsys, tmp_path
):
    out = _bench(capsys, "accuracy", "--seeds", "1", "--out", str(tmp_path))
    assert (out["benchmark"], out["seeds"], out["split"]) == ("accuracy", [1], "final")
    assert out["photos"] == ["coffee", "rocket", "ihc", "motorcycle"]
    assert set(out["settings"]) == {"scratch", "pretrained"}
    for name, setting in out["settings"].items():
        assert setting["budget_sec"] == 3600.0
        (r,) = setting["runs"]
        assert r["seed"] == 1 and r["order"] == ["ours", "peer"]  # odd: ours first
        _check_accuracy_run(
            {**r, "reserve_sec": setting["reserve_sec"]}, 3600.0, out["margin"]
        )
        _check_summary(setting)
        # Every training crop on both sides (QUICK_TASK: 24 per photograph).
        assert r["ours"]["train_images"] == 4 * 24
        _same_images(
            tmp_path / f"final-{name}-1" / "task", str(tmp_path / f"final-{name}-1")
        )
        # The budget did not bind: both trained their planned epochs.
        assert r["ours"]["epochs"] == r["ours"]["epochs_planned"] == 2
        assert r["peer"]["epochs"] == r["peer"]["epochs_planned"] == 2
        assert r["peer"]["stop_reason"] is None
    peer = out["settings"]["pretrained"]["runs"][0]["peer"]
    assert peer["model"] == "efficientnet-lite0 (ImageNet)"
    assert peer["epochs_per_phase"] == [
        1,
        1,
    ]  # the head on the frozen backbone, then all


@pytest.mark.slow
def test_bench_accuracy_budget_stops_both_sides_and_is_reported_as_missed(
    capsys, tmp_path
):
    """A budget of 1 s: the peer (first on an even seed) stops after its first
    step, ours after the first epoch, which train() always completes; both end
    past it, and the report says so."""
    out = _bench(
        capsys, "accuracy", "--setting", "scratch", "--seeds", "0",
        "--budget", "1", "--out", str(tmp_path),
    )  # fmt: skip
    setting = out["settings"]["scratch"]
    (r,) = setting["runs"]
    assert r["order"] == ["peer", "ours"] and setting["budget_sec"] == 1.0
    _check_accuracy_run(
        {**r, "reserve_sec": setting["reserve_sec"]}, 1.0, out["margin"]
    )
    _check_summary(setting)
    peer, ours = r["peer"], r["ours"]
    assert peer["stop_reason"] == "budget reached mid-epoch" and peer["epochs"] == 1
    assert ours["epochs"] == 1 < ours["epochs_planned"]
    assert ours["stop_reason"].startswith("time limit")
    assert not peer["within_budget"] and not ours["within_budget"]
    assert setting["all_within_budget"] is False


def test_contenders_alternate_by_seed():
    from shopee_tpu.bench.accuracy import order, run_in_order

    calls = []
    for seed in range(4):
        result = run_in_order(
            {name: (lambda n=name: calls.append(n) or {}) for name in ("peer", "ours")},
            seed,
        )
        assert list(result) == order(seed)
        assert result[order(seed)[0]]["started_sec"] == 0.0
    assert calls == ["peer", "ours", "ours", "peer"] * 2


def test_a_contender_keeps_the_budget_within_the_margin():
    from shopee_tpu.bench.accuracy import MARGIN, within

    assert MARGIN == 0.03
    assert within(309.0, 300.0) and not within(309.1, 300.0)
    assert within(1e9, None)


def test_peer_recipe_overrides_are_typed_and_named():
    from shopee_tpu.bench.accuracy import SETTINGS, peer_recipe

    base = SETTINGS["scratch"].peer
    recipe = peer_recipe(base, ["epochs=40", "learning_rate=1e-3"])
    assert (recipe.epochs, recipe.learning_rate) == (40, 1e-3)
    assert recipe.application == base.application
    with pytest.raises(ValueError, match="--peer-set 'epoch=40'.*epochs"):
        peer_recipe(base, ["epoch=40"])
    with pytest.raises(ValueError, match="epochs takes a int"):
        peer_recipe(base, ["epochs=4.5"])


class _Clock:
    """Seconds that pass only when a step says so: ``durations[i]`` per step of
    epoch ``i`` (the last one repeats)."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, durations


def _fit_with_budget(durations, *, budget, reserve, epochs=20, fits=1):
    import keras
    import numpy as np

    from shopee_tpu.bench.peer import StopBefore

    clock = _Clock(durations)

    class Tick(keras.callbacks.Callback):  # before StopBefore: a step takes time
        def on_epoch_begin(self, epoch, logs=None):
            self.seconds = clock.durations[min(self.epoch_seen, len(durations) - 1)]
            self.epoch_seen += 1

        def on_train_batch_end(self, batch, logs=None):
            clock.now += self.seconds

    tick = Tick()
    tick.epoch_seen = 0
    stop = StopBefore(0.0, budget, reserve, clock=lambda: clock.now)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((10, 2), "float32"), np.zeros((10, 1), "float32")
    steps = []
    for _ in range(fits):
        if stop.stopped:
            break
        history = model.fit(
            x, y, batch_size=1, epochs=epochs, callbacks=[tick, stop], verbose=0
        )
        steps.append(len(history.history["loss"]))
    return stop, steps, clock.now


def test_the_peer_stops_before_an_epoch_that_would_eat_into_its_reserve():
    # 10 steps of 1 s: after epoch k, 85 - 10 k s are left before the reserve;
    # the 9th epoch (10 s) would not fit after the 8th.
    stop, steps, now = _fit_with_budget([1.0], budget=100, reserve=15)
    assert steps == [8] and now == 80.0
    assert stop.reason == "the next epoch (~10s) would not fit"
    # A slow first epoch (the trace) is the estimate only until a steady one is
    # seen: 30 s, then 10 s ones, until 5 s are left.
    stop, steps, now = _fit_with_budget([3.0, 1.0], budget=100, reserve=15)
    assert steps == [6] and now == 80.0
    # Before that, it is: 30 s used, 25 s left < 30 s.
    stop, steps, now = _fit_with_budget([3.0, 1.0], budget=85, reserve=30)
    assert steps == [1] and now == 30.0
    # A second fit (the all-layers phase) expects its first epoch to last as
    # long as the longest first epoch so far, then its own steady ones.
    stop, steps, now = _fit_with_budget([1.0], budget=100, reserve=15, epochs=5, fits=3)
    assert steps == [5, 3] and now == 80.0


def test_the_peer_stops_mid_epoch_once_the_reserve_is_reached():
    # Epoch 1: 10 s, leaving 15 s (>= 10). Epoch 2 runs at 3 s a step: the
    # reserve is reached after 5 steps; the step that reaches it is the last.
    stop, steps, now = _fit_with_budget([1.0, 3.0], budget=25, reserve=0)
    assert steps == [2] and now == 25.0
    assert stop.reason == "budget reached mid-epoch"
    # No budget: every epoch runs.
    stop, steps, _ = _fit_with_budget([1.0], budget=None, reserve=5, epochs=3)
    assert steps == [3] and stop.reason is None


def test_bench_accuracy_summary_is_the_mean_and_sample_std_over_seeds():
    from shopee_tpu.bench.accuracy import summarize

    def run(p, o, g, t, kept=True):
        sides = {"within_budget": kept}
        return {
            "peer_accuracy": p,
            "ours": {"test_accuracy": o, **sides},
            "peer": sides,
            "gain": g,
            "time_ratio": t,
        }

    runs = [run(0.7, 0.8, 0.1, 0.9), run(0.6, 0.9, 0.3, 1.0), run(0.8, 0.7, -0.1, 0.8)]
    assert summarize(runs) == {
        "peer_accuracy": {"mean": 0.7, "std": 0.1},
        "ours_accuracy": {"mean": 0.8, "std": 0.1},
        "gain": {"mean": 0.1, "std": 0.2},
        "time_ratio": {"mean": 0.9, "std": 0.1},
        "all_within_budget": True,
    }
    assert summarize(runs[:1])["gain"] == {"mean": 0.1, "std": 0.0}
    assert (
        summarize([*runs, run(0.7, 0.8, 0.1, 0.9, kept=False)])["all_within_budget"]
        is False
    )
