"""The notebooks' install cell: the same in every notebook; in a fresh venv without
the package it installs a wheel built from this checkout and says so, and where
the package imports it installs nothing."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def _cell(path: str, tag: str) -> str:
    with open(path, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    (cell,) = [c for c in cells if tag in c["metadata"].get("tags", [])]
    return "".join(cell["source"])


def test_every_notebook_installs_itself_right_after_its_parameters():
    cells = {_cell(nb, "install") for nb in NOTEBOOKS}
    assert len(NOTEBOOKS) == 4 and len(cells) == 1
    for nb in NOTEBOOKS:
        with open(nb, encoding="utf-8") as f:
            tags = [c["metadata"].get("tags", []) for c in json.load(f)["cells"]]
        first = [i for i, t in enumerate(tags) if t][:2]
        assert [tags[i] for i in first] == [["parameters"], ["install"]], nb
        assert 'SHOPEE_TPU_SOURCE = "/content/drive/MyDrive/shopee_tpu-0.1.0-py3' in (
            _cell(nb, "parameters")
        )


def _run_cell(python: str, source: str, extras: str, cwd) -> str:
    code = f"SHOPEE_TPU_SOURCE = {source!r}\nSHOPEE_TPU_EXTRAS = {extras!r}\n" + _cell(
        NOTEBOOKS[0], "install"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run(
        [python, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_cell_installs_a_wheel_of_this_checkout_into_a_fresh_venv(tmp_path):
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO],
        check=True,
        timeout=600,
    )
    (wheel,) = glob.glob(str(wheels / "shopee_tpu-*.whl"))
    # A fresh venv that sees our venv's packages but not shopee_tpu, like Colab or
    # Kaggle (keras, numpy, pandas... installed; the package not): a .pth adds the
    # site-packages folder to sys.path, and the editable install's own .pth inside
    # it is not read from there. pip then installs the wheel alone; that the
    # dependencies resolve from nothing is what every `make venv` proves.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = next(p for p in sys.path if p.endswith("site-packages"))
    with open(os.path.join(site, "our-packages.pth"), "w") as f:
        f.write(ours + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    missing = subprocess.run(
        [python, "-c", "import shopee_tpu"], capture_output=True, cwd=tmp_path, env=env
    )
    assert missing.returncode != 0

    # A relative path, as a user types it: installed with no extras asked for.
    relative = os.path.relpath(wheel, tmp_path)
    said = _run_cell(python, relative, "", tmp_path)
    assert said == f"shopee_tpu: installed shopee_tpu @ file://{wheel}"
    version = subprocess.run(
        # Keras needs a backend, which no extra was asked for: the package alone.
        [python, "-c", "import shopee_tpu; print(shopee_tpu.__version__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert version.stdout.strip() == "0.1.0", version.stderr[-2000:]
    # Run again (as on a notebook's rerun): nothing to do.
    said = _run_cell(python, relative, "", tmp_path)
    assert said == "shopee_tpu: already importable; nothing installed"
