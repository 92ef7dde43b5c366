"""The ``shopee-tpu`` command line: the installed console script and the config
layers (--preset, --config, --set) it shares with notebooks."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from shopee_tpu.cli import main, parse_duration
from shopee_tpu.config import PRESETS

SCRIPT = os.path.join(os.path.dirname(sys.executable), "shopee-tpu")


def test_console_script_help_lists_the_commands():
    proc = subprocess.run(
        [SCRIPT, "--help"], capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: shopee-tpu")
    for command in ("config", "tfrecords", "train", "predict", "demo", "bench"):
        assert f"\n    {command} " in proc.stdout or f"\n    {command}\n" in proc.stdout


def test_config_prints_the_resolved_json(capsys):
    assert main(["config", "--preset", "demo", "--set", "epochs=3"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 3
    assert printed == PRESETS["demo"].override("epochs=3").to_dict()


def test_config_layers_preset_file_and_sets(tmp_path, capsys):
    diff = tmp_path / "diff.yaml"
    diff.write_text("epochs: 5\noptim:\n  optimizer: sgd\n")
    argv = ["config", "--preset", "shopee-b2", "--config", str(diff)]
    argv += ["--set", "epochs=9", "--set", "data.train=/recs"]

    assert main(argv) == 0

    printed = json.loads(capsys.readouterr().out)
    assert (printed["epochs"], printed["optim"]["optimizer"]) == (9, "sgd")
    assert printed["data"] == {**PRESETS["shopee-b2"].data.to_dict(), "train": "/recs"}


def test_bad_key_exits_2_and_names_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "--preset", "demo", "--set", "optim.lr=0.1"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'optim.lr'" in err and "learning_rate" in err  # known keys listed


def test_console_script_bad_key_exit_status():
    proc = subprocess.run(
        [SCRIPT, "config", "--set", "epoch=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "'epoch'" in proc.stderr and proc.stdout == ""


def test_parse_duration():
    assert parse_duration("8h45m") == 31500
    assert parse_duration("90m") == 5400
    assert parse_duration("1h0m30s") == 3630
    assert parse_duration("45") == 45
    assert parse_duration("1.5h") == 5400
    for bad in ("8h45", "soon", "", "5d"):
        with pytest.raises(argparse.ArgumentTypeError, match="duration"):
            parse_duration(bad)
