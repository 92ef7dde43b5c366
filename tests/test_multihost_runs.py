"""Several JAX hosts on one machine (2 processes x 2 host devices over loopback, as
the hosts of a pod slice): k-fold, ``shopee-tpu predict`` and ``st.predict``
finish with what one process gets; a run folder that some host cannot see is
refused in one line; a shared one resumes on every host from the same epoch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from test_multihost_jax import run_hosts
from test_training_jax import result_of

pytestmark = pytest.mark.slow

SETS = [*TINY, "model.weights=none", "batch_size=4", "epochs=1"]

PREDICT = r"""
import json, os, sys
import numpy as np
import shopee_tpu as st
from shopee_tpu.cli import main
from shopee_tpu.data.read.pipeline import load_dataset
from shopee_tpu.inference.run import load_run_model

out, train, test, tag = sys.argv[1:5]
index = os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID", "0")
sets = [a for s in json.loads(sys.argv[5]) for a in ("--set", s)]
if tag == "hosts":  # the k-fold run, on every host
    args = ["train", "--preset", "demo", "--folds", "2", "--set", f"data.train={train}"]
    assert main([*args, *sets, "--out", f"{out}/kfold"]) == 0
assert main(["predict", "--run", f"{out}/kfold", "--data", test,
             "--out", f"{out}/{tag}.csv"]) == 0
# st.predict as a notebook calls it, with every view in one call (the TPU's way;
# on a CPU the command line sends one view per call).
acc = st.connect(verbose=False)
model, _, _, size = load_run_model(f"{out}/kfold/fold-0", accelerator=acc)
test_ds = load_dataset(test, image_size=size, batch_size=acc.batch_size(4),
                       training=False)
ids, probs = st.predict(model, test_ds, tta=("identity", "flip_lr"),
                        views_per_call=None)
np.savez(f"{out}/{tag}-{index}.npz", ids=ids, probs=probs)
# Hosts that pass datasets of different lengths are told so, instead of one of
# them waiting for ever in a batch the others never send.
blank = np.zeros((8, size, size, 3), np.uint8)
try:
    st.predict(model, [blank] * (2 + int(index)), views_per_call=None)
    said = ""
except ValueError as e:
    said = str(e)
with open(f"{out}/{tag}-{index}.txt", "w") as f:
    f.write(said)
"""


def test_kfold_and_predict_on_two_hosts_equal_one_host(digits_records, tmp_path):
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    args = [str(script), str(tmp_path), digits_records["train"]]
    args += [digits_records["test"]]
    hosts = run_hosts([*args, "hosts", json.dumps(SETS)])
    for code, _, stderr in hosts:
        assert code == 0, stderr[-6000:]
    # One process over as many devices, on the weights the hosts trained.
    ((code, _, stderr),) = run_hosts([*args, "one", "[]"], hosts=1, devices=4)
    assert code == 0, stderr[-6000:]

    # The k-fold run finished on both hosts with every record's out-of-fold
    # probabilities, every host taking part in each held-out prediction.
    oof = np.load(tmp_path / "kfold" / "oof.npz")
    folds = pd.read_csv(tmp_path / "kfold" / "folds.csv", dtype={"id": str})
    assert sorted(oof["ids"].astype(str)) == sorted(folds["id"])
    assert np.isfinite(oof["probs"]).all()
    np.testing.assert_allclose(oof["probs"].astype(float).sum(-1), 1, atol=2e-3)
    metrics = json.loads((tmp_path / "kfold" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["oof_images"] == len(folds)
    # shopee-tpu predict: the fold ensemble's submission and probabilities, as one
    # process writes them (only the chief of the two wrote).
    assert (tmp_path / "hosts.csv").read_text() == (tmp_path / "one.csv").read_text()
    two, one = (np.load(tmp_path / f"{t}.probs.npz") for t in ("hosts", "one"))
    np.testing.assert_array_equal(two["ids"], one["ids"])
    np.testing.assert_allclose(two["probs"], one["probs"], rtol=0, atol=1e-6)
    # st.predict: every host gets every row, in order, as one process does.
    runs = [np.load(tmp_path / f"{t}.npz") for t in ("hosts-0", "hosts-1", "one-0")]
    for run in runs[:2]:
        np.testing.assert_array_equal(run["ids"], runs[2]["ids"])
        np.testing.assert_allclose(run["probs"], runs[2]["probs"], rtol=0, atol=1e-6)
    assert len(runs[2]["ids"]) == 56  # the test records, once each
    for index in (0, 1):
        said = (tmp_path / f"hosts-{index}.txt").read_text()
        assert "number of batches differs between the hosts" in said
        assert "(host 0: 2, host 1: 3)" in said


FOLDERS = r"""
import contextlib, hashlib, io, json, os, sys
import numpy as np
import shopee_tpu as st
from shopee_tpu.cli import main
from shopee_tpu.config import RunConfig

out, train = sys.argv[1:3]
index = os.environ["KERAS_DISTRIBUTION_PROCESS_ID"]
sets = [f"data.train={train}", *json.loads(sys.argv[3])]
found = {}
# Each host its own folder: refused at the start, on every host.
err = io.StringIO()
args = [a for s in sets for a in ("--set", s)]
with contextlib.redirect_stderr(err):
    code = main(["train", "--preset", "demo", *args, "--out", f"{out}/own-{index}"])
found["refused"] = [code, err.getvalue()]


def seen():
    import keras

    class Seen(keras.callbacks.Callback):
        # The epochs each host trains, and its weights when the fit starts.
        def on_train_begin(self, logs=None):
            digest = hashlib.md5()
            for w in self.model.get_weights():
                digest.update(np.ascontiguousarray(w).tobytes())
            found.setdefault("weights", []).append(digest.hexdigest())

        def on_epoch_begin(self, epoch, logs=None):
            found.setdefault("epochs", []).append(epoch + 1)

    return Seen()


# One shared folder: stopped by the time limit after epoch 1, then resumed.
cfg = RunConfig.preset("demo").override(*sets, "epochs=2")
shared = f"{out}/shared"
first = st.train(cfg, out_dir=shared, time_limit=1, callbacks=[seen])
found["first"] = first.metrics["epochs_completed"]
found["epochs_before"], found["epochs"] = found.pop("epochs"), []
second = st.train(cfg, out_dir=shared, callbacks=[seen])
found["second"] = second.metrics["epochs_completed"]
print("RESULT " + json.dumps(found))
"""


def test_an_unshared_run_folder_is_refused_and_a_shared_one_resumes_together(
    digits_records, tmp_path
):
    script = tmp_path / "folders.py"
    script.write_text(FOLDERS)
    args = [str(script), str(tmp_path), digits_records["train"], json.dumps(SETS)]
    hosts = run_hosts(args)
    for code, _, stderr in hosts:
        assert code == 0, stderr[-6000:]
    found = [result_of(stdout) for _, stdout, _ in hosts]

    for index, r in enumerate(found):
        code, said = r["refused"]
        assert code == 1 and said.count("\n") == 1, said
        assert said.startswith(f"shopee-tpu train: error: {tmp_path}/own-{index}: ")
        assert "host 1 (" in said and "of 2 does not see the run folder" in said
        assert "that host 0 (" in said and "gs:// bucket" in said
        # Refused before anything trained.
        assert not (tmp_path / f"own-{index}" / "state.json").exists()
    # The shared folder: epoch 1, stopped by the limit; then both hosts resumed
    # from it with the same weights and trained epoch 2 only.
    for r in found:
        assert (r["first"], r["second"]) == (1, 2)
        assert (r["epochs_before"], r["epochs"]) == ([1], [2])
    assert found[0]["weights"] == found[1]["weights"]
    history = pd.read_csv(tmp_path / "shared" / "history.csv")
    assert history.epoch.tolist() == [1, 2]
