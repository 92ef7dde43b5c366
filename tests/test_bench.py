"""Every benchmark runs once at its ``--quick`` size through the CLI. Speed is never
asserted; the figures are: each reported ratio, fraction and gain is recomputed
from the rounds (or runs) the JSON carries, so an inverted ratio or a wrong
formula fails, and each verdict follows from its figure."""

from __future__ import annotations

import json
import math
import os
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
    corpus = out["corpus"]
    assert (corpus["folder"], corpus["found"], corpus["used"]) == ("synthetic", 64, 64)
    assert corpus["classes"] == 10 and corpus["longer_side_px"][2] == 96
    limit = out["decode_limit"]
    parallel = ("parallel_decode", "ours", "ours_no_augment", "ours_private_pool")
    stages = ("read", "parse", "single_thread", "decode_flip", "ours_one_thread")
    names = {*parallel, *stages}
    rates, used = limit["images_per_sec"], limit["cores_used"]
    cpu_us, switches = limit["cpu_us_per_image"], limit["context_switches_per_image"]
    assert set(rates) == set(used) == set(cpu_us) == set(switches) == names
    assert all(
        min(s["rounds"]) >= 0 and len(s["rounds"]) == 2 for s in switches.values()
    )
    for name in names:  # CPU per image = busy cores / images per second
        _is_product(
            cpu_us[name],
            1,
            ([1e6, 1e6], 1, None),
            (_rounds(used[name], 2), 1, 2),
            (_rounds(rates[name], 1), -1, 1),
        )
    single, cores = _rounds(rates["single_thread"], 1), out["cores"]
    for name in parallel:
        _is_product(
            limit[f"{name}_over_cores_x_single_thread"],
            3,
            (_rounds(rates[name], 1), 1, 1),
            ([cores, cores], -1, None),
            (single, -1, 1),
        )
    work = limit["per_cpu_second_over_single_thread"]
    assert set(work) == set(parallel)
    for name in work:  # the single thread's CPU per image over this one's
        _is_product(
            work[name],
            3,
            (_rounds(cpu_us["single_thread"], 1), 1, 1),
            (_rounds(cpu_us[name], 1), -1, 1),
        )
    # Ours' fraction of the limit is the product of its two factors.
    factors = limit["ours_factors"]
    assert factors["work"] == work["ours"]
    _is_product(
        factors["cores"],
        3,
        (_rounds(used["ours"], 2), 1, 2),
        ([cores, cores], -1, None),
        (_rounds(used["single_thread"], 2), -1, 2),
    )
    _is_product(
        limit["ours_over_cores_x_single_thread"],
        3,
        (_rounds(factors["work"], 3), 1, 3),
        (_rounds(factors["cores"], 3), 1, 3),
    )
    # The breakdown: each stage's CPU per image over the previous one's, and
    # together ours' (medians, reported to 0.1 us).
    chain = [*stages, "ours"]
    steps = limit["breakdown_cpu_us_per_image"]
    assert list(steps) == ["read", "parse", "decode", "flip", "pipeline", "threads"]
    medians = [cpu_us[n]["median"] for n in chain]
    want = [medians[0]] + [b - a for a, b in zip(medians, medians[1:])]
    for got, expected in zip(steps.values(), want, strict=True):
        assert abs(got - expected) <= 0.21
    assert abs(sum(steps.values()) - cpu_us["ours"]["median"]) <= 0.4
    goal = out["ours_over_cores_x_single_thread_median"]
    assert goal == limit["ours_over_cores_x_single_thread"]["median"]
    assert out["meets_target"] == (goal >= 0.92)

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
    # 2/1 = (CPU per image with 1 / with n) x (cores busy with n / with 1).
    cpu_ms, busy = e2e["writer_cpu_ms_per_image"], e2e["writer_busy_cores"]
    _is_product(
        e2e["writer_n_over_1"],
        3,
        (_rounds(cpu_ms["write_1_process"], 2), 1, 2),
        (_rounds(cpu_ms["write"], 2), -1, 2),
        (_rounds(busy["write"], 2), 1, 2),
        (_rounds(busy["write_1_process"], 2), -1, 2),
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
    # The same in CPU seconds: the write's (every process) over the CPU an epoch
    # of ours saves against one of the directory loader.
    cpu = e2e["cpu_seconds_per_epoch"]
    saved_cpu = cpu["directory"] - cpu["ours"]
    write_cpu = e2e["write_cpu_seconds"]
    assert abs(write_cpu - cpu_ms["write"]["median"] * 64 / 1000) <= 0.0011
    want = round(write_cpu / saved_cpu, 2) if saved_cpu > 0 else None
    assert e2e["break_even_epochs_cpu"] == want

    steps = out["writer_steps"]
    ms = steps["cpu_ms_per_image"]
    assert steps["images"] == 8 and all(v > 0 for v in ms.values())
    parts = ms["draft_decode_resize"] + ms["encode"] + ms["md5"] + ms["record"]
    assert abs(steps["writer_cpu_ms_per_image"] - parts) <= 0.003
    draft, full = ms["draft_decode_resize"], ms["full_decode_resize"]
    slack = draft / full * (5e-4 / draft + 5e-4 / full) + 5e-4  # 3-decimal figures
    assert abs(steps["draft_over_full_decode_resize"] - draft / full) <= slack
    err = steps["draft_mean_abs_pixel_error"]
    assert 0 < err["mean"] <= err["max"]
    # The floor: writing that cost only the entropy decoding of every image.
    floor = steps["break_even_epochs_floor_cpu"]
    if saved_cpu > 0:
        want = ms["entropy_decode"] * 64 / 1000 / saved_cpu
        assert abs(floor - want) <= 0.005 + want * 5e-4 / ms["entropy_decode"]
    else:
        assert floor is None

    goals = out["goals"]
    assert set(goals) == {
        "ours_over_cores_x_single_thread",
        "writer_n_over_1",
        "break_even_epochs",
    }
    assert goals["ours_over_cores_x_single_thread"]["value"] == goal
    assert goals["writer_n_over_1"]["value"] == e2e["writer_n_over_1"]["median"]
    assert goals["break_even_epochs"] == {
        "value": be,
        "goal": "<= 2.0",
        "met": be is not None and be <= 2.0,
    }


def test_bench_input_corpus_is_every_jpeg_below_the_folder(tmp_path):
    from PIL import Image

    from shopee_tpu.bench.input_corpus import class_layout, find_jpegs

    def jpeg(path, w, h):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 120, 30)).save(path)

    jpeg(tmp_path / "shoes" / "a.jpg", 1200, 1000)
    jpeg(tmp_path / "shoes" / "deep" / "er" / "b.JPEG", 1000, 1400)
    jpeg(tmp_path / "bags" / "c.jpeg", 999, 2000)  # shorter side below 1000
    jpeg(tmp_path / "top.jpg", 1500, 1500)
    (tmp_path / "bags" / "notes.txt").write_text("not an image")
    (tmp_path / "linked").symlink_to(tmp_path / "shoes")
    rows, small = find_jpegs(str(tmp_path), min_side=1000)
    assert small == 1
    assert [(os.path.relpath(p, tmp_path), label) for p, label in rows] == [
        ("top.jpg", "all"),
        ("linked/a.jpg", "linked"),
        ("linked/deep/er/b.JPEG", "linked"),
        ("shoes/a.jpg", "shoes"),
        ("shoes/deep/er/b.JPEG", "shoes"),
    ]
    assert len(find_jpegs(str(tmp_path))[0]) == 6
    table = class_layout(rows, str(tmp_path / "by_class"))
    assert sorted(os.listdir(tmp_path / "by_class")) == ["all", "linked", "shoes"]
    assert table["label"].tolist() == [label for _, label in rows]
    with pytest.raises(ValueError, match="no JPEG files with a shorter side of 3000"):
        find_jpegs(str(tmp_path), min_side=3000)
    with pytest.raises(ValueError, match="not a folder"):
        find_jpegs(str(tmp_path / "top.jpg"))


@pytest.mark.slow
@pytest.mark.long
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


@pytest.mark.slow
@pytest.mark.long
def test_bench_export_speedups_and_accuracy_lost_follow_from_the_runs(capsys, tmp_path):
    out = _bench(capsys, "export", "--rounds", "2", "--out", str(tmp_path))
    assert (out["bench"], out["quick"], out["model"]) == ("export", True, "tiny-cnn")
    keras = out["accuracy"]["keras"]
    n = out["test_images"]
    assert keras["accuracy"] == round(keras["correct"] / n, 6)
    for name in ("litert_float32", "litert_float16", "litert_int8", "onnx"):
        acc = out["accuracy"][name]
        assert acc["exported_accuracy"] == round(acc["exported_correct"] / n, 6)
        drop = round(100 * (keras["correct"] - acc["exported_correct"]) / n, 4)
        assert acc["accuracy_drop_points"] == drop
    for name in ("litert_float32", "onnx"):  # float32: the Keras predictions
        assert out["accuracy"][name]["top1_agreement"] == 1.0
    for threads in ("1_thread", "2_threads"):
        latency = out["latency_ms"][threads]
        keras_rounds = _rounds(latency["keras"], 3)
        for name, fig in out["speedup_over_keras_single_image"][threads].items():
            # Keras's latency over the export's, round by round.
            _is_product(
                fig, 3, (keras_rounds, 1, 3), (_rounds(latency[name], 3), -1, 3)
            )
            _rounds(out["images_per_sec"][threads][name], 2)
        assert (
            out["int8_over_keras_single_image"][threads]
            == (out["speedup_over_keras_single_image"][threads]["litert_int8"])
        )
    goal = out["goal"]
    speed = {k: v["median"] for k, v in out["int8_over_keras_single_image"].items()}
    assert goal["int8_speedup_medians"] == speed
    lost = out["accuracy"]["litert_int8"]["accuracy_drop_points"]
    assert goal["met"] == (min(speed.values()) >= 3.0 and lost <= 0.5)


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

    from shopee_tpu.data.read.pipeline import read_ids_labels

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
@pytest.mark.long
def test_bench_accuracy_quick_pretrained_figures_follow_from_the_runs(capsys, tmp_path):
    # The pretrained setting end to end (the scratch one: the budget test below).
    out = _bench(
        capsys, "accuracy", "--setting", "pretrained", "--seeds", "1",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert (out["benchmark"], out["seeds"], out["split"]) == ("accuracy", [1], "final")
    assert out["photos"] == ["coffee", "rocket", "ihc", "motorcycle"]
    assert set(out["settings"]) == {"pretrained"}
    setting = out["settings"]["pretrained"]
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
        tmp_path / "final-pretrained-1" / "task", str(tmp_path / "final-pretrained-1")
    )
    # The budget did not bind: both trained their planned epochs; an hour that
    # cannot bind sets no epoch count (no calibration run).
    assert r["ours"]["epochs"] == r["ours"]["epochs_planned"] == 2
    assert r["peer"]["epochs"] == r["peer"]["epochs_planned"] == 2
    assert r["peer"]["stop_reason"] is None
    assert setting["peer_calibration"] is None
    assert setting["peer_recipe"]["epochs"] == 2
    peer = r["peer"]
    assert peer["model"] == "efficientnet-lite0 (ImageNet)"
    # The head on the frozen backbone, then all: one epoch each.
    assert peer["epochs_per_phase"] == [1, 1] and len(peer["epoch_sec"]) == 2


@pytest.mark.slow
@pytest.mark.long
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
    # Nothing fits a second: the calibration (a traced and a steady epoch of the
    # recipe) gives the peer its least, 1 epoch.
    calibration = setting["peer_calibration"]
    assert len(calibration["epoch_sec"]) == 2 and calibration["epochs_that_fit"] < 1
    assert calibration["epochs"] == peer["epochs_planned"] == 1
    assert ours["epochs"] == 1 < ours["epochs_planned"]
    assert ours["stop_reason"].startswith("time limit")
    assert not peer["within_budget"] and not ours["within_budget"]
    assert setting["all_within_budget"] is False


def test_the_peer_gets_the_epochs_its_short_run_says_fit():
    from shopee_tpu.bench.accuracy import CALIBRATION_SAFETY, peer_epochs_for
    from shopee_tpu.bench.peer import PeerRecipe

    assert CALIBRATION_SAFETY == 0.02
    recipe = PeerRecipe(epochs=30)
    # 300 s less 2 %: 294 s; less setup 4, prediction 10 and the trace's extra
    # 8 s (18 - 10): 272 s, 27 steady epochs of 10 s.
    short = {"epoch_sec": [18.0, 10.0], "setup_sec": 4.0, "after_training_sec": 10.0}
    assert peer_epochs_for(300.0, short, recipe, False) == (27, 27)
    assert peer_epochs_for(1000.0, short, recipe, False) == (30, 95)  # the recipe's
    assert peer_epochs_for(10.0, short, recipe, False) == (1, -2)  # at least one
    # Pretrained: a traced head epoch (12 s), a traced all-layers one (20 s), a
    # steady one (10 s): both traces add 12 s; at least the head's 2 and one more.
    tuned = PeerRecipe(epochs=12, head_epochs=2)
    short["epoch_sec"] = [12.0, 20.0, 10.0]
    assert peer_epochs_for(200.0, short, tuned, True) == (12, 17)
    assert peer_epochs_for(100.0, short, tuned, True) == (7, 7)
    assert peer_epochs_for(20.0, short, tuned, True) == (3, -1)


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


def _fit_with_budget(durations, *, budget, reserve, epochs=20, fits=1, steady=None):
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
    stop = StopBefore(0.0, budget, reserve, steady, clock=lambda: clock.now)
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
    # Unless a calibration run timed a steady epoch (10 s): then 25 s left fit
    # the next, and 15 s the one after; 5 s do not.
    stop, steps, now = _fit_with_budget([3.0, 1.0], budget=85, reserve=30, steady=10)
    assert steps == [3] and now == 50.0
    assert stop.reason == "the next epoch (~10s) would not fit"
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


def _fashion_idx(folder, train: int = 200, test: int = 50) -> None:
    """Small Fashion-MNIST look-alikes as the four idx files (gzipped, as Debian
    ships them): 28 px grey noise with a bright bar whose height is the class."""
    import numpy as np

    from shopee_tpu.data.write.idx import write_idx

    rng = np.random.default_rng(0)
    for stem, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 7, 4:24] = 200
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)


@pytest.mark.slow
@pytest.mark.long
def test_bench_fashion_alternates_and_its_figures_follow_from_the_runs(
    capsys, tmp_path
):
    import json as json_

    data = tmp_path / "data"
    data.mkdir()
    _fashion_idx(data)
    work = tmp_path / "work"
    out = _bench(capsys, "fashion", "--data", str(data), "--out", str(work))
    assert (out["seeds"], out["split"], out["budget_sec"]) == ([0, 1], "final", 240)
    runs = out["runs"]
    # The order alternates from seed to seed.
    assert [r["order"] for r in runs] == [["peer", "ours"], ["ours", "peer"]]
    calibration = out["peer_calibration"]
    assert calibration["epochs"] == 2 and calibration["epoch_sec"] > 0
    for r in runs:
        peer, ours = r["peer"], r["ours"]
        for side in (peer, ours):  # accuracies are counts of the 50 test images
            assert side["test_accuracy"] * 50 == pytest.approx(
                round(side["test_accuracy"] * 50)
            )
            assert side["train_images"] == 200
        assert peer["epochs"] == peer["epochs_planned"] == 2
        assert ours["epochs"] <= ours["epochs_planned"] <= ours["epochs_asked"] == 3
        assert (ours["preset"], ours["backbone"]) == ("small-images", "small-resnet-w4")
        assert r["peer_accuracy"] == peer["test_accuracy_flip_tta"]
        assert r["gain"] == round(ours["test_accuracy"] - r["peer_accuracy"], 4)
        for side in (peer, ours):
            kept = side["wall_time_sec"] <= 240 * (1 + out["margin"])
            assert side["within_budget"] == kept
        assert r["time_ratio"] == round(
            ours["wall_time_sec"] / peer["wall_time_sec"], 3
        )
        assert r["speed_ratio"] == round(
            ours["images_per_sec"] / peer["images_per_sec"], 3
        )
    for key, values in (
        ("peer_accuracy", [r["peer_accuracy"] for r in runs]),
        ("ours_accuracy", [r["ours"]["test_accuracy"] for r in runs]),
        ("gain", [r["gain"] for r in runs]),
        ("time_ratio", [r["time_ratio"] for r in runs]),
        ("speed_ratio", [r["speed_ratio"] for r in runs]),
    ):
        assert out[key]["mean"] == round(statistics.fmean(values), 4), key
        assert out[key]["std"] == round(statistics.stdev(values), 4), key
    kept = [r[side]["within_budget"] for r in runs for side in ("peer", "ours")]
    assert out["all_within_budget"] == all(kept)
    # Ours went through the library's records: the grey images stored as PNG.
    manifest = json_.loads(
        (work / "ours-0" / "records" / "train" / "manifest.json").read_text()
    )
    assert manifest["total"] == 200 and manifest["channels"] == 1
    assert manifest["image_formats"] == {"PNG": 200}


def test_bench_fashion_without_the_files_is_one_line(capsys, tmp_path):
    assert main(["bench", "fashion", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert str(tmp_path) in err[0]
