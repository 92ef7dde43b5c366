"""Plots draw headless and keep the user's matplotlib backend."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SCRIPT = """
import sys
import matplotlib
{choose}
from shopee_tpu import plots
fig = plots.plot_history(
    {{"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7],
      "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}},
    sys.argv[1],
)
print(matplotlib.get_backend().lower())
"""


def _draw(tmp_path, choose: str) -> tuple[str, bytes]:
    png = tmp_path / "history.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(choose=choose), str(png)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-1], png.read_bytes()


def test_the_users_backend_is_left_alone(tmp_path):
    backend, png = _draw(tmp_path, 'matplotlib.use("svg")')
    assert backend == "svg"
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_headless_without_a_choice_draws_with_agg(tmp_path):
    backend, png = _draw(tmp_path, "")
    assert backend == "agg"
    assert png.startswith(b"\x89PNG") and len(png) > 5000
