"""A run whose classes are names, end to end: arrays with class names -> records ->
``train`` -> ``shopee-tpu predict`` -> a validated named submission."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, photo_crops

pytestmark = pytest.mark.slow

NAMES = ["Ankle boot", "Bag", "T-shirt/top"]


def test_predict_writes_class_names_and_probabilities(tmp_path, capsys):
    from shopee_tpu.cli import main
    from shopee_tpu.config import RunConfig
    from shopee_tpu.data import write_arrays
    from shopee_tpu.inference.ensemble import load_probs
    from shopee_tpu.inference.submission import validate_named_submission
    from shopee_tpu.training import train

    crops, labels = photo_crops(72, 32, seed=5), np.arange(72) % 3
    write_arrays(crops[:60], labels[:60], tmp_path / "train", NAMES, workers=1)
    test_ids = [f"item-{i}.png" for i in range(12)]
    # Labelled test records: the prediction is also scored.
    write_arrays(
        crops[60:], labels[60:], tmp_path / "test", NAMES, ids=test_ids, workers=1
    )
    cfg = RunConfig.preset("demo").override(
        *TINY, f"data.train={tmp_path / 'train'}", "epochs=1", "batch_size=16"
    )
    train(cfg, out_dir=str(tmp_path / "run"), verbose=0)
    capsys.readouterr()

    out = tmp_path / "submission.csv"
    argv = ["predict", "--run", str(tmp_path / "run"), "--data",
            str(tmp_path / "test"), "--out", str(out)]  # fmt: skip
    assert main([*argv, "--probability", "--tta", "identity"]) == 0
    label_map = {name: i for i, name in enumerate(NAMES)}
    sub = validate_named_submission(out, test_ids, label_map)
    assert list(sub.columns) == ["filename", "category", "probability"]
    saved = load_probs(tmp_path / "submission.probs.npz")
    probs = pd.DataFrame(saved.probs.astype(np.float32), index=saved.ids)
    probs = probs.loc[sub["filename"]].to_numpy()
    assert sub["category"].tolist() == [NAMES[k] for k in probs.argmax(1)]
    got = sub["probability"].astype(float).to_numpy()
    np.testing.assert_allclose(got, probs.max(1), atol=1e-3)  # float16 on disk
    assert '"accuracy":' in capsys.readouterr().out

    # Without --probability the default is the two named columns; Shopee's
    # numbered format refuses the names in one line, before predicting.
    assert main(argv) == 0
    assert pd.read_csv(out).columns.tolist() == ["filename", "category"]
    capsys.readouterr()
    assert main([*argv, "--format", "shopee"]) == 1
    assert capsys.readouterr().err.strip() == (
        "shopee-tpu predict: error: the shopee format takes classes that are "
        "numbers; these have names (e.g. 'Ankle boot'): write the named format "
        "(--format named or auto)"
    )
