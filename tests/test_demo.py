"""Demo smoke: the main job end to end through the CLI, in its quick setting."""

import json
import os
import subprocess
import sys

import pandas as pd
from conftest import REPO


def test_quick_demo_trains_well_above_chance_and_writes_a_valid_submission(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "shopee_tpu.cli", "demo", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Ten classes: chance is 0.1.
    assert metrics["test_accuracy"] >= 0.5, metrics
    assert metrics["test_accuracy_product_sum"] >= metrics["test_accuracy"] - 0.05
    assert metrics["md5_overrides"]["hits"] >= 1
    submission = pd.read_csv(out / "submission.csv", dtype=str)
    test = pd.read_csv(out / "data" / "test.csv", dtype=str)
    assert list(submission.columns) == ["filename", "category"]
    assert sorted(submission.filename) == sorted(test.filename)
    assert submission.category.str.fullmatch(r"\d\d").all()
