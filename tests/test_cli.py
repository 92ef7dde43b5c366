"""The ``shopee-tpu`` command line: the installed console script and the config
layers (--preset, --config, --set) it shares with notebooks."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, xla_flags

import shopee_tpu
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


def _run(*argv, env=None, module=False):
    """Runs the installed command (or ``python -m shopee_tpu``) with TensorFlow's
    C++ logging left at its default, as a user's shell has it."""
    full_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "shopee_tpu"] if module else [SCRIPT]
    return subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, timeout=300, env=full_env
    )


def _one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no traceback, no C++ log lines
    assert lines[0].startswith("shopee-tpu ") and ": error: " in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version_and_python_dash_m_alias():
    proc = _run("--version", module=True)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"shopee-tpu {shopee_tpu.__version__}"
    proc = _run("--help", module=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: shopee-tpu")


def test_device_and_reduce_are_checked_against_their_choices(capsys):
    for argv in (
        ["train", "--device", "tpuv5"],
        ["predict", "--run", "r", "--data", "d", "--reduce", "median"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice" in err and "choose from" in err


@pytest.mark.slow
def test_missing_tpu_is_one_line_with_the_way_out(tmp_path):
    proc = _run(
        "train",
        "--preset",
        "demo",
        "--set",
        f"data.train={tmp_path}",
        "--device",
        "tpu",
        "--out",
        str(tmp_path / "run"),
    )
    _one_line_error(proc, "train: error:", "no TPU found", "KERAS_BACKEND")
    assert "I0000" not in proc.stderr and "W0000" not in proc.stderr


@pytest.mark.slow
def test_the_device_variable_is_the_default_of_train(tmp_path):
    # One rule: --device (or a config's device), then SHOPEE_TPU_DEVICE, then auto.
    args = ["train", "--preset", "demo", "--set", f"data.train={tmp_path}"]
    args += ["--out", str(tmp_path / "run")]
    proc = _run(*args, env={"SHOPEE_TPU_DEVICE": "tpu"})
    _one_line_error(proc, "connect(device='tpu')", "no TPU found")
    # --device wins over the variable: the CPU, then the (empty) records' error.
    proc = _run(*args, "--device", "cpu", env={"SHOPEE_TPU_DEVICE": "tpu"})
    _one_line_error(proc, str(tmp_path))
    assert "no TPU" not in proc.stderr


@pytest.mark.slow
def test_a_tpu_vm_never_trains_on_the_cpu_quietly(tmp_path):
    # Kaggle's TPU VM markers, and Keras fixed on TensorFlow (KERAS_BACKEND here;
    # in a notebook, an import before connect()): TensorFlow cannot use the TPU.
    args = ["train", "--preset", "demo", "--set", f"data.train={tmp_path}"]
    args += ["--out", str(tmp_path / "run")]
    tpu_vm = {"ISTPUVM": "1", "TPU_PROCESS_ADDRESSES": "local"}
    proc = _run(*args, env={**tpu_vm, "KERAS_BACKEND": "tensorflow"})
    line = _one_line_error(proc, "this is a TPU VM (ISTPUVM=1", "KERAS_BACKEND")
    assert "tensorflow-cpu" in line and "device='cpu'" in line
    # Asked for on purpose, the CPU trains (here: up to the empty records' error).
    proc = _run(*args, "--device", "cpu", env={**tpu_vm, "KERAS_BACKEND": "tensorflow"})
    _one_line_error(proc, str(tmp_path))
    assert "TPU VM" not in proc.stderr
    # No backend chosen: the command line picks JAX before anything starts Keras
    # (8 CPU devices stand in for the chips, asked for with JAX_PLATFORMS=cpu).
    stand_in = {"XLA_FLAGS": xla_flags(8)}
    proc = _run(*args, env={**tpu_vm, **stand_in, "JAX_PLATFORMS": "cpu"})
    _one_line_error(proc, str(tmp_path))
    assert "CPU x8 replica(s), backend=jax" in proc.stdout


def test_missing_files_are_one_line(tmp_path):
    proc = _run("predict", "--run", str(tmp_path / "nope"), "--data", str(tmp_path))
    _one_line_error(proc, "config.json", "training run folder")


def test_missing_demo_extra_names_the_extra(tmp_path):
    # A Python where scikit-learn is not importable, exactly like a core install.
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from shopee_tpu.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    line = _one_line_error(proc, "pip install 'shopee_tpu[demo]'", "sklearn")
    assert "demo" in line
    assert not (tmp_path / "demo").exists()  # refused before doing any work


@pytest.mark.slow
def test_unavailable_weights_are_one_line(digits_records, tmp_path):
    # Offline, as on a Kaggle kernel with internet off: nothing listens on port 9,
    # and an empty Keras cache (KERAS_HOME) holds no copy of the file.
    argv = ["train", "--preset", "demo", "--out", str(tmp_path / "run")]
    argv += ["--set", f"data.train={digits_records['train']}"]
    argv += ["--set", "model.backbone=efficientnet-b0"]
    argv += ["--set", "model.weights=imagenet"]
    code = (
        "import sys\n"
        "from shopee_tpu.models.weights import records as weights\n"
        "weights.KERAS_WEIGHTS_URL = 'http://127.0.0.1:9/'\n"
        "from shopee_tpu.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(KERAS_HOME=str(tmp_path / "keras"), PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    # One error line, last; before it at most one-line notes (the hold-out's).
    assert err[-1].startswith("shopee-tpu train: error: ")
    assert all(line.startswith("shopee-tpu train: note: ") for line in err[:-1])
    assert "Kaggle dataset" in err[-1] and "efficientnetb0_notop.h5" in err[-1]


def test_our_warnings_are_one_line_notes_and_others_unchanged(tmp_path):
    # A hold-out of 10 % over 4 shards must take 25 %: the note says so on one line.
    from shopee_tpu.data.read.files import holdout_files

    for i in range(4):
        (tmp_path / f"train-{i:05d}-10.tfrec").write_bytes(b"")
    code = (
        "import sys, warnings\n"
        "from shopee_tpu.console import one_line_warnings\n"
        "from shopee_tpu.data.read.files import holdout_files\n"
        "one_line_warnings('shopee-tpu train')\n"
        f"holdout_files({str(tmp_path)!r}, 0.1, 0)\n"
        "warnings.warn('from elsewhere')\n"
    )
    with pytest.warns(UserWarning, match="held out 1 of 4 shards"):
        holdout_files(str(tmp_path), 0.1, 0)  # the same call raises a real warning
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    lines = out.stderr.splitlines()
    ours = [line for line in lines if line.startswith("shopee-tpu train: note: ")]
    assert len(ours) == 1 and "held out 1 of 4 shards" in ours[0], lines
    assert not any("holdout_files" in line or "warnings.warn" in line for line in ours)
    # Another module's warning keeps Python's format (file, line, category).
    assert any("UserWarning: from elsewhere" in line for line in lines), lines
