"""``shopee-tpu sweep``: a 2 x 2 grid on real digit records gives four run folders,
the results table and plot, and a rerun that trains nothing; bad grids are named."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from conftest import TINY

from shopee_tpu.config import ConfigError, RunConfig

SETS = (
    *TINY,
    "batch_size=16",
    "optim.warmup_epochs=0.5",
    "epochs=2",
    "steps_per_epoch=2",
)
GRID = ["model.dropout=0,0.5", "optim.label_smoothing=0,0.1"]


@pytest.mark.slow
@pytest.mark.long
def test_sweep_of_2x2_points_writes_the_table_and_a_rerun_trains_nothing(
    digits_records, tmp_path, capsys
):
    from shopee_tpu.cli import main

    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--preset",
        "demo",
        "--set",
        f"data.train={digits_records['train']}",
    ]
    for s in SETS:
        args += ["--set", s]
    for g in GRID:
        args += ["--grid", g]
    args += ["--out", str(out)]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert "4 of 4 points trained" in first
    names = {
        "dropout-0_label_smoothing-0",
        "dropout-0_label_smoothing-0.1",
        "dropout-0.5_label_smoothing-0",
        "dropout-0.5_label_smoothing-0.1",
    }
    assert names <= set(os.listdir(out))
    for name in names:
        cfg = json.loads((out / name / "config.json").read_text())
        dropout, smoothing = name.split("_label_smoothing-")
        assert cfg["model"]["dropout"] == float(dropout.removeprefix("dropout-"))
        assert cfg["optim"]["label_smoothing"] == float(smoothing)
        assert cfg["epochs"] == 2 and cfg["model"]["backbone"] == "tiny-cnn"

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results.run) == names
    assert results["model.dropout"].tolist() == [0.0, 0.0, 0.5, 0.5]
    assert results["optim.label_smoothing"].tolist() == [0.0, 0.1, 0.0, 0.1]
    for _, row in results.iterrows():
        metrics = json.loads((out / row.run / "metrics.json").read_text())
        assert row.best_val_accuracy == round(metrics["best_val_accuracy"], 4)
        assert row.epochs == 2 and row.train_time_sec > 0 and row.status == "finished"
    table = (out / "results.md").read_text()
    assert table.count("\n| 0") == 4 and "best_val_accuracy" in table
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    mtimes = {n: os.path.getmtime(out / n / "last.weights.h5") for n in names}
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "0 of 4 points trained" in again and again.count("finished; skipped") == 4
    assert {n: os.path.getmtime(out / n / "last.weights.h5") for n in names} == mtimes
    assert pd.read_csv(out / "results.csv").equals(results)

    # A changed base is refused for finished points instead of mixing two sweeps.
    assert main([*args, "--set", "optim.learning_rate=0.5"]) == 1
    assert "optim.learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "item, message",
    [
        (
            "model.dropuot=0,0.1",
            "'model.dropuot' is not a config key; did you mean model.dropout",
        ),
        ("epoch=1,2", "keys at the top level: name, epochs"),
        ("model.dropout=0,abc", "--grid model.dropout: value 'abc' does not parse"),
        ("augment.flip_lr=true,maybe", "value 'maybe' does not parse"),
        ("model.dropout", "expects key=value1,value2"),
        ("out_dir=a,b", "the sweep sets out_dir"),
    ],
)
def test_bad_grids_name_the_key_and_value(item, message, tmp_path, capsys):
    from shopee_tpu.cli import main
    from shopee_tpu.experiments.sweep import parse_grid

    with pytest.raises(ConfigError) as info:
        parse_grid([item], RunConfig.preset("demo"))
    assert message in str(info.value)
    with pytest.raises(SystemExit) as code:
        main(["sweep", "--preset", "demo", "--grid", item, "--out", str(tmp_path)])
    assert code.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
