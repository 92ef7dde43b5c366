"""End to end: digits in the Shopee layout -> TFRecords -> a run folder ->
``predict_run`` / ``shopee-tpu predict`` -> validated submissions."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

# One worker runs this module: its module fixture trains once, not once per worker.
pytestmark = [pytest.mark.xdist_group("inference_run"), pytest.mark.slow]

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from shopee_tpu.config import RunConfig
    from shopee_tpu.data.samples.digits import make_digits_dataset
    from shopee_tpu.data.write.records import write_records_from_csv
    from shopee_tpu.models import build_from_config

    root = tmp_path_factory.mktemp("run_e2e")
    # Many exact duplicates of training images in the test set, for the MD5 part.
    info = make_digits_dataset(
        root / "digits", image_size=SIZE, limit=300, duplicate_fraction=0.25, seed=1
    )
    train = write_records_from_csv(
        info["train_csv"], info["train_images"], root / "train", shards=2, workers=1
    )
    # test_labels.csv carries the product groups; test=True ignores its category.
    write_records_from_csv(
        info["test_labels_csv"],
        info["test_images"],
        root / "test",
        test=True,
        shards=2,
        workers=1,
        label_map=train["label_map"],
    )
    cfg = RunConfig.preset("demo").override(
        f"data.train={root / 'train'}", f"data.image_size={SIZE}", "batch_size=16"
    )
    run = root / "run"
    run.mkdir()
    cfg.save(run / "config.json")
    (run / "label_map.json").write_text(json.dumps(train["label_map"]))
    model = build_from_config(cfg.model, len(train["label_map"]), image_size=SIZE)
    model.save_weights(str(run / "best.weights.h5"))
    return {"root": root, "info": info, "run": run, "model": model, "train": train}


def test_predict_run_writes_each_test_filename_once(setup):
    from shopee_tpu import predict
    from shopee_tpu.data.read.pipeline import load_dataset
    from shopee_tpu.inference.ensemble import load_probs
    from shopee_tpu.inference.run import predict_run
    from shopee_tpu.inference.submission import validate_shopee_submission

    out = setup["root"] / "sub.csv"
    df = predict_run(setup["run"], setup["root"] / "test", out=out, verbose=False)
    test_csv = setup["info"]["test_csv"]
    label_map = setup["train"]["label_map"]
    validate_shopee_submission(out, test_csv, label_map)  # raises on any problem
    want = pd.read_csv(test_csv)["filename"].tolist()
    assert sorted(df["filename"]) == sorted(want) and len(df) == len(want)
    assert df["category"].str.fullmatch(r"\d\d").all()

    # The probabilities beside the submission equal a direct predict() of the
    # same model with the run's TTA (identity + shift_2 in the demo preset).
    saved = load_probs(str(out)[:-4] + ".probs.npz")
    assert saved.ids.tolist() == df["filename"].tolist()
    assert saved.meta["tta"] == ["identity", "shift_2"]
    ds = load_dataset(
        setup["root"] / "test", image_size=SIZE, batch_size=16, training=False
    )
    ids, probs = predict(setup["model"], ds, tta=("identity", "shift_2"))
    assert ids.tolist() == saved.ids.tolist()
    np.testing.assert_allclose(saved.probs, probs, atol=2e-3)


def test_md5_dictionary_fixes_duplicates_and_cdiscount_format_via_cli(setup):
    from shopee_tpu.cli import main
    from shopee_tpu.inference.md5 import build_from_records
    from shopee_tpu.inference.run import predict_run
    from shopee_tpu.inference.submission import validate_cdiscount_submission

    root = setup["root"]
    dictionary = build_from_records(root / "train")
    assert dictionary.stats["images"] == setup["info"]["train"]
    dictionary.save(root / "md5.npz")
    truth = pd.read_csv(
        setup["info"]["test_labels_csv"], dtype={"category": str}
    ).set_index("filename")
    dups = truth[truth["group"].str.startswith("d")]
    assert len(dups) >= 5

    df = predict_run(
        setup["run"],
        root / "test",
        out=root / "sub_md5.csv",
        md5_dict=root / "md5.npz",
        tta=("identity",),
        verbose=False,
    )
    stats = df.attrs["summary"]["md5_images"]
    assert stats["hits"] == len(dups) and stats["images"] == len(truth)
    got = df.set_index("filename").loc[dups.index, "category"]
    assert (got == dups["category"]).all()  # every duplicate gets its train label

    code = main(
        [
            "predict",
            "--run", str(setup["run"]),
            "--data", str(root / "test"),
            "--out", str(root / "cd.csv"),
            "--format", "cdiscount",
            "--md5-dict", str(root / "md5.npz"),
            "--tta", "identity,flip_lr",
        ]
    )  # fmt: skip
    assert code == 0
    products = truth["group"].unique().tolist()
    sub = validate_cdiscount_submission(
        root / "cd.csv", products, setup["train"]["label_map"]
    )
    assert len(sub) == len(products)
    assert os.path.exists(root / "cd.probs.npz")
