"""Several JAX hosts on one machine: 2 processes x 4 host devices joined over
loopback through Keras's distribution variables, as the hosts of a TPU pod slice.

Two processes run the README's command line, as ``python -m shopee_tpu`` runs it:
together they train one model, each host on its own rows. What each process hands
to its devices is recorded after Keras's own dataset handling
(``jax.make_array_from_process_local_data``, through which Keras's JAX trainer
sends every host's rows; ``test_multihost_jax.SITECUSTOMIZE``): each training image
carries its record number in its pixels, so the test sees which records each host
fed at each step.

Two more processes (``make test-long``) run, one after the other:

- a run folder that some host cannot see: refused in one line; a shared one
  stopped and resumed on every host from the same epoch;
- k-fold, ``shopee-tpu predict`` and ``st.predict``: they finish with what one
  process over as many devices gets.

Each process pays ~10 s of imports, so the long scenarios share their processes;
one worker runs them (their fixture starts the hosts once).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from test_multihost_jax import (
    SIDE,
    SITECUSTOMIZE,
    TRAIN,
    VALID,
    records_with_ids,
    run_hosts,
)
from test_training_jax import result_of

pytestmark = pytest.mark.slow

SETS = [*TINY, "model.weights=none", "batch_size=4", "epochs=1"]
README_DONE = "=== the README command ended ==="

HOSTS = r"""
import atexit, json, os, runpy, sys

out, train, test, tag = sys.argv[1:5]
if tag == "readme":
    # The README's command, as `python -m shopee_tpu` runs it, before anything
    # else is imported; then what the hosts fed their devices is saved.
    import sitecustomize

    argv, sys.argv = sys.argv, ["shopee_tpu", *json.loads(sys.argv[6])]
    try:
        runpy.run_module("shopee_tpu", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code == 0, f"the README command exited with {e.code}"
    sys.argv = argv
    sitecustomize.save()
    atexit.unregister(sitecustomize.save)
    print("=== the README command ended ===", flush=True)
    sys.exit(0)

import contextlib, hashlib, io
import numpy as np
import shopee_tpu as st
from shopee_tpu.cli import main
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read.pipeline import load_dataset
from shopee_tpu.inference.run import load_run_model

index = os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID", "0")
sets = [f"data.train={train}", *json.loads(sys.argv[5])]
args = [a for s in sets for a in ("--set", s)]
found = {}


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


if tag == "hosts":
    # Each host its own folder: refused at the start, on every host.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--preset", "demo", *args, "--out", f"{out}/own-{index}"])
    found["refused"] = [code, err.getvalue()]

    # One shared folder: stopped by the time limit after epoch 1, then resumed.
    cfg = RunConfig.preset("demo").override(*sets, "epochs=2")
    shared = f"{out}/shared"
    first = st.train(cfg, out_dir=shared, time_limit=1, callbacks=[seen])
    found["first"] = first.metrics["epochs_completed"]
    found["epochs_before"], found["epochs"] = found.pop("epochs"), []
    second = st.train(cfg, out_dir=shared, callbacks=[seen])
    found["second"] = second.metrics["epochs_completed"]

    # The k-fold run, on every host.
    kfold = ["train", "--preset", "demo", "--folds", "2", *args]
    assert main([*kfold, "--out", f"{out}/kfold"]) == 0
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
print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def readme_hosts(tmp_path_factory):
    """Two hosts run the README's command, recording what they feed."""
    root = tmp_path_factory.mktemp("multihost_readme")
    script = root / "hosts.py"
    script.write_text(HOSTS)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    readme = readme_command(root)
    two = run_hosts(
        [str(script), str(root), "-", "-", "readme", "[]", json.dumps(readme)],
        devices=4,
        path=[str(root / "site")],
        SHOPEE_TEST_FEED_LOG=str(root / "feeds"),
    )
    for code, _, stderr in two:
        assert code == 0, stderr[-6000:]
    return root, two


@pytest.fixture(scope="module")
def hosts(digits_records, tmp_path_factory):
    """Two hosts run the long scenarios; then one process over as many devices
    predicts from the weights the hosts trained."""
    root = tmp_path_factory.mktemp("multihost_runs")
    script = root / "hosts.py"
    script.write_text(HOSTS)
    args = [str(script), str(root), digits_records["train"], digits_records["test"]]
    two = run_hosts([*args, "hosts", json.dumps(SETS)], devices=4)
    for code, _, stderr in two:
        assert code == 0, stderr[-6000:]
    ((code, _, stderr),) = run_hosts([*args, "one", "[]"], hosts=1, devices=8)
    assert code == 0, stderr[-6000:]
    return root, two


def readme_command(root) -> list[str]:
    """The README's command, on a tiny model: 8 replicas x batch 2 = 16 a step,
    on records whose images carry their ids (1..200, valid 1001..1040)."""
    train = records_with_ids(root / "train", range(1, TRAIN + 1), shards=5)
    valid = records_with_ids(root / "valid", range(1001, 1001 + VALID), shards=2)
    command = ["train", "--preset", "shopee-b0"]
    for setting in (
        f"data.train={train}",
        f"data.valid={valid}",
        "model.backbone=tiny-cnn",
        "model.weights=none",
        f"data.image_size={SIDE}",
        "epochs=2",
        "batch_size=2",
    ):
        command += ["--set", setting]
    return [*command, "--out", str(root / "runs" / "hosts")]


@pytest.mark.long
@pytest.mark.xdist_group("multihost_runs")  # one worker starts the long hosts
def test_kfold_and_predict_on_two_hosts_equal_one_host(hosts):
    tmp_path, _ = hosts
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


@pytest.mark.long
@pytest.mark.xdist_group("multihost_runs")
def test_an_unshared_run_folder_is_refused_and_a_shared_one_resumes_together(hosts):
    tmp_path, two = hosts
    found = [result_of(stdout) for _, stdout, _ in two]
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


def test_the_readme_command_on_two_jax_hosts_trains_one_model_on_disjoint_rows(
    readme_hosts,
):
    tmp_path, two = readme_hosts
    out = tmp_path / "runs" / "hosts"
    said = two[0][1].split(README_DONE)[0]
    assert "CPU x8" in said and "hosts=2, worker 1/2" in said

    feeds = [json.loads((tmp_path / f"feeds.{i}").read_text()) for i in range(2)]
    # Every batch crossed to the devices as uint8 pixels.
    assert {f["dtype"] for host in feeds for f in host["feeds"]} == {"uint8"}
    # One model: the same weights on both processes when fit starts and ends.
    assert feeds[0]["weights"] == feeds[1]["weights"]
    assert [tag for tag, _ in feeds[0]["weights"]] == ["start", "end"]

    steps = TRAIN // 16  # 12 steps an epoch: 192 of the 200 records
    rows = [
        [f["ids"] for f in host["feeds"] if 0 < f["ids"][0] <= TRAIN and not f["peek"]]
        for host in feeds
    ]
    for host in rows:  # one batch of 8 rows per step and host: 2 epochs
        assert len(host) == 2 * steps and {len(batch) for batch in host} == {8}
    epochs = [
        [
            {i for batch in host[e * steps : (e + 1) * steps] for i in batch}
            for host in rows
        ]
        for e in range(2)
    ]
    # Each host fed its own records in every epoch (a host's part is the same
    # in every pass); in the first, 96 distinct ones each, 192 of the 200.
    for epoch in epochs:
        assert epoch[0].isdisjoint(epoch[1])
        assert epoch[0] | epoch[1] <= set(range(1, TRAIN + 1))
    assert [len(ids) for ids in epochs[0]] == [8 * steps, 8 * steps]

    # Validation: each host its own records, every record once (blank padding
    # rows decode to 0).
    seen = [
        i
        for host in feeds
        for f in host["feeds"]
        if not f["peek"]
        for i in f["ids"]
        if i > 1000
    ]
    assert sorted(seen) == sorted([*range(1001, 1001 + VALID)] * 3)  # 2 epochs, report

    # One run folder, written by process 0: exactly its epochs, once each.
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["replicas"], metrics["hosts"], metrics["backend"]) == (8, 2, "jax")
    assert metrics["train_images"] == TRAIN and metrics["valid_images"] == VALID
    assert 0 <= metrics["val_accuracy_best_weights"] <= 1
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2]
    assert history.iterations.tolist() == [steps, 2 * steps]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hosts"]
