"""``shopee-tpu tune``: 3 quick Optuna trials on the digits, killed in the second
and resumed (in another process), end with 3 trials, none repeated; bad search
spaces are named."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO, TINY, kill_when

from shopee_tpu.config import ConfigError, RunConfig, config_diff

SETS = (*TINY, "batch_size=16", "optim.warmup_epochs=0.5", "epochs=2")
SPACE = ["optim.learning_rate=1e-3:3e-2:log", "model.dropout=0:0.5"]


def _args(records, out) -> list[str]:
    args = ["tune", "--preset", "demo", "--set", f"data.train={records['train']}"]
    for s in (*SETS, "steps_per_epoch=40"):
        args += ["--set", s]
    for s in SPACE:
        args += ["--space", s]
    return [*args, "--trials", "3", "--out", str(out)]


def _complete(out) -> int:
    path = out / "study.db"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("select count(*) from trials where state='COMPLETE'")
            return rows.fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


@pytest.mark.slow
@pytest.mark.long
def test_three_trials_killed_in_the_second_resume_without_repeating(
    digits_records, tmp_path, capsys
):
    import optuna

    from shopee_tpu.cli import main

    out = tmp_path / "tune"
    args = _args(digits_records, out)
    cmd = [sys.executable, "-m", "shopee_tpu.cli", *args]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    kill_when(
        proc,
        lambda: _complete(out) >= 1 and (out / "trial-001" / "state.json").exists(),
        timeout=600,
        poll=0.05,
    )
    assert _complete(out) == 1

    # Resumed by another process (this one): trial 1 where it stopped, then
    # trial 2 sampled by the reloaded study.
    assert main(args) == 0
    resumed = capsys.readouterr().out
    assert ": trial 2 of 3:" in resumed and ": trial 3 of 3:" in resumed
    assert ": trial 1 of 3:" not in resumed
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out}/study.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 3  # none repeated
    base = RunConfig.preset("demo").override(
        f"data.train={digits_records['train']}", *SETS, "steps_per_epoch=40"
    )
    for t in trials:
        assert 1e-3 <= t.params["optim.learning_rate"] <= 3e-2
        assert 0 <= t.params["model.dropout"] <= 0.5
        # The trial trained what the study sampled: its run folder's config is
        # the base config with exactly the sampled values, nothing else changed.
        folder = out / f"trial-{t.number:03d}"
        saved = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
        assert saved.optim.learning_rate == t.params["optim.learning_rate"]
        assert saved.model.dropout == t.params["model.dropout"]
        assert config_diff(base, saved, ignore=("out_dir", "name")) == [
            f"model.dropout: {base.model.dropout!r} -> {t.params['model.dropout']!r}",
            f"optim.learning_rate: {base.optim.learning_rate!r} -> "
            f"{t.params['optim.learning_rate']!r}",
        ]
        assert (saved.name, saved.out_dir) == (folder.name, str(folder))
        history = pd.read_csv(out / f"trial-{t.number:03d}" / "history.csv")
        assert history.epoch.tolist() == [1, 2]  # the killed trial resumed, once
        metrics = pd.read_json(
            out / f"trial-{t.number:03d}" / "metrics.json", typ="series"
        )
        assert t.value == pytest.approx(metrics["best_val_accuracy"])
    results = pd.read_csv(out / "results.csv")
    assert results.trial.tolist() == [0, 1, 2]
    assert results.status.tolist() == ["finished"] * 3
    assert results.best_val_accuracy.tolist() == pytest.approx(
        [t.value for t in trials], abs=1e-4
    )
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    assert (
        "Search over optim.learning_rate, model.dropout"
        in (out / "results.md").read_text()
    )

    # The same command once more: nothing left to train.
    assert main(args) == 0
    assert ": trial " not in capsys.readouterr().out


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.learnig_rate=1e-4:1e-2", "did you mean optim.learning_rate"),
        ("optim.learning_rate=1e-2:1e-4", "need low < high"),
        ("optim.learning_rate=0:1e-2:log", "low > 0 with log"),
        ("optim.learning_rate=1e-4:1e-2:cubic", "expected low:high or low:high:log"),
        ("model.backbone=1:3", "a range needs a numeric key"),
        ("model.dropout=0,abc", "value 'abc' does not parse"),
        ("out_dir=a,b", "tune sets out_dir"),
        ("model.dropout", "expects key=a,b"),
    ],
)
def test_bad_search_spaces_are_named(item, message):
    from shopee_tpu.experiments.search import parse_space

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_space([item], RunConfig.preset("demo"))


def test_integer_keys_search_whole_numbers():
    from shopee_tpu.experiments.search import parse_space

    (epochs, tta) = parse_space(
        ["epochs=2:9", "predict.reduce=mean,geometric"], RunConfig()
    )
    assert (epochs.integer, epochs.low, epochs.high) == (True, 2.0, 9.0)
    assert tta.choices == ("mean", "geometric")


def test_a_quiet_search_connects_quietly(tmp_path, capsys):
    from shopee_tpu.experiments import tune

    # No records: the trial's run stops at its first read, after the connect.
    missing = tmp_path / "no-records"
    base = RunConfig.preset("demo").override(*TINY, f"data.train={missing}")
    with pytest.raises(FileNotFoundError, match="no-records"):
        tune(base, SPACE, tmp_path / "tune", trials=1, verbose=0)
    assert capsys.readouterr().out == ""
