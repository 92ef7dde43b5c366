"""The Kaggle TPU path on CPU: ``train()`` on the JAX backend over 8 host devices
(standing in for a v5e-8) with the ``shopee-b0`` recipe at tiny size, killed with
SIGKILL after epoch 1 and resumed; validation on 8 replicas against a numpy
recomputation; TTA predict through the CLI; mixed_bfloat16 training and resuming.

Each JAX child is a fresh interpreter (the backend and device count are fixed at
start) and costs its imports and JAX start, so a child runs every check that can
share it; the children share the session's JAX compilation cache (conftest), so a
resumed run does not compile again what the killed one compiled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, xla_flags

from shopee_tpu.config import RunConfig
from shopee_tpu.training.plan import epoch_steps as _epoch_steps

OUTER_ENV = ("TF_CONFIG", "SHOPEE_TPU_DEVICE", "ISTPUVM", "TPU_NAME", "KERAS_BACKEND")


def jax_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a JAX child over ``devices`` host devices (with the
    session's compilation cache, from conftest)."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_ENV}
    env.update(
        KERAS_BACKEND="jax",
        XLA_FLAGS=xla_flags(devices),
        PYTHONPATH=REPO,
        **extra,
    )
    return env


def results_of(stdout: str) -> list[dict]:
    """Every ``RESULT {json}`` line a child printed, in order."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"child printed no RESULT line:\n{stdout[-3000:]}"
    return [json.loads(line[len("RESULT ") :]) for line in lines]


def result_of(stdout: str) -> dict:
    return results_of(stdout)[-1]


# The shopee-b0 recipe (Adam, ramp schedule with linear LR scaling, label
# smoothing, steps_per_execution=32, flip augmentation) at a size 2 cores train.
def shopee_b0_tiny(records: dict, out, *extra: str) -> RunConfig:
    return RunConfig.preset("shopee-b0").override(
        f"data.train={records['train']}",
        "data.image_size=32",
        "model.backbone=efficientnet-phi-6",
        "model.weights=none",
        "epochs=2",
        "batch_size=4",
        f"out_dir={out}",
        *extra,
    )


# Trains (or resumes) the run, recomputes validation with numpy from the best
# weights' probabilities over exactly the held-out records, then runs the CLI
# command given after the config (in this process: a JAX child's imports and
# compiles cost more than its work).
TRAIN_AND_CHECK = r"""
import json, sys
import numpy as np
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read import pipeline
from shopee_tpu.inference.tta import predict
from shopee_tpu.training import train

cfg = RunConfig.load(sys.argv[1])
result = train(cfg)
model = result.model
_, valid_files = pipeline.holdout_files(
    cfg.data.train, cfg.data.valid_fraction, cfg.seed)
images = pipeline.load_dataset(
    valid_files, image_size=32, batch_size=8, training=False, labels=True)
_, probs = predict(model, images, tta="identity")
labels = np.concatenate([y.numpy().argmax(1) for _, y in images])
top2 = np.sort(probs, axis=1)[:, -2:]
smooth = cfg.optim.label_smoothing
target = np.eye(probs.shape[1])[labels] * (1 - smooth) + smooth / probs.shape[1]
loss = -(target * np.log(np.clip(probs, 1e-7, 1 - 1e-7))).sum(1).mean()
print("RESULT " + json.dumps(dict(
    history=result.history, metrics=result.metrics,
    numpy_accuracy=float((probs.argmax(1) == labels).mean()),
    numpy_loss=float(loss), near_ties=int((top2[:, 1] - top2[:, 0] < 1e-5).sum()),
    n_valid=int(len(labels)), output_dtype=str(model.outputs[0].dtype))), flush=True)
if len(sys.argv) > 2:  # then the rest of the command line, as `shopee-tpu ...`
    from shopee_tpu.cli import main
    sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def killed_and_resumed(digits_records, tmp_path_factory):
    """The tiny shopee-b0 run on 8 JAX devices: SIGKILLed once epoch 1 is
    committed, then run again to the end, and `shopee-tpu predict` with TTA over
    the test records from the finished run's folder."""
    root = tmp_path_factory.mktemp("jax_run")
    out = root / "run"
    cfg_path = root / "cfg.json"
    shopee_b0_tiny(digits_records, out).save(cfg_path)
    script = root / "train.py"
    script.write_text(TRAIN_AND_CHECK)
    sub = root / "submission.csv"
    predict = ["predict", "--run", str(out), "--data", digits_records["test"]]
    predict += ["--out", str(sub), "--tta", "identity,flip_lr"]
    cmd = [sys.executable, str(script), str(cfg_path), *predict]
    env = jax_env(8)

    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        state_path = out / "state.json"
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and proc.poll() is None:
            if state_path.exists() and json.loads(state_path.read_text())["epoch"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_state = json.loads((out / "state.json").read_text())

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-5000:]
    return dict(
        out=out,
        killed_state=killed_state,
        stdout=done.stdout,
        result=result_of(done.stdout),
        submission=sub,
    )


@pytest.mark.slow
@pytest.mark.xdist_group("jax8")  # one worker trains the fixture's run
@pytest.mark.long
def test_shopee_b0_on_eight_jax_devices_resumes_after_sigkill(killed_and_resumed):
    run = killed_and_resumed
    out = run["out"]
    # Killed after epoch 1 was committed and before epoch 2 was.
    assert run["killed_state"]["epoch"] == 1 and not run["killed_state"]["finished"]
    assert "resuming after epoch 1 of 2" in run["stdout"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["backend"], metrics["replicas"], metrics["hosts"]) == ("jax", 8, 1)
    assert metrics["finished"] and metrics["epochs_completed"] == 2
    # An epoch (184 records / global batch 32 = 5 steps) shorter than the preset's
    # steps_per_execution of 32 runs as one call of 5 steps, not 32.
    steps = metrics["steps_per_epoch"]
    assert steps == metrics["train_images"] // 32 == 5
    assert metrics["steps_per_execution"] == 5

    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [1, 2]
    assert history.iterations.tolist() == [steps, 2 * steps]
    for column in ("val_accuracy", "val_loss", "accuracy", "loss", "lr"):
        assert history[column].notna().all() and np.isfinite(history[column]).all()
    assert ((history.val_accuracy >= 0) & (history.val_accuracy <= 1)).all()


@pytest.mark.slow
@pytest.mark.xdist_group("jax8")  # one worker trains the fixture's run
@pytest.mark.long
def test_validation_on_eight_replicas_equals_numpy_over_the_real_records(
    killed_and_resumed,
):
    r = killed_and_resumed["result"]
    metrics = r["metrics"]
    n = metrics["valid_images"]
    assert r["n_valid"] == n and n % 8 and n % 32  # padding was needed
    best = next(h for h in r["history"] if h["epoch"] == metrics["best_epoch"])
    # Fit's validation (padded batches on 8 replicas) and a numpy recomputation
    # from the best weights over exactly the n records agree: counting the blank
    # rows would move the accuracy by at least 1/64. Rows whose top two classes
    # differ by under 1e-5 may flip between the two programs.
    # (The history holds float32 figures: within half a record is exact agreement.)
    assert abs(best["val_accuracy"] - r["numpy_accuracy"]) * n <= r["near_ties"] + 0.5
    assert (
        abs(metrics["val_accuracy_best_weights"] - r["numpy_accuracy"]) * n
        <= (r["near_ties"])
    )
    np.testing.assert_allclose(best["val_loss"], r["numpy_loss"], rtol=2e-4)
    assert r["output_dtype"] == "float32"


@pytest.mark.slow
@pytest.mark.xdist_group("jax8")  # one worker trains the fixture's run
@pytest.mark.long
def test_tta_predict_through_the_cli_on_eight_jax_devices(
    killed_and_resumed, digits_records
):
    from shopee_tpu.data.read.pipeline import count_records, read_ids_labels

    test = digits_records["test"]
    n = count_records(test)
    assert n % 32  # a ragged last batch for 8 replicas x 4
    # The fixture's child ran `shopee-tpu predict --run RUN --data TEST --tta
    # identity,flip_lr` after its training had printed its RESULT line.
    stdout = killed_and_resumed["stdout"]
    predicted = stdout[stdout.index("RESULT ") :]
    assert "CPU x8" in predicted and "backend=jax" in predicted
    sub = killed_and_resumed["submission"]
    table = pd.read_csv(sub, dtype=str)
    ids = read_ids_labels(test)["id"].tolist()
    assert len(table) == n and sorted(table.filename) == sorted(ids)
    probs = np.load(sub.with_suffix(".probs.npz"))
    assert len(probs["ids"]) == n == len(set(probs["ids"].tolist()))


# In the child: after every step, the head's raw kernel and its EMA average; the
# average must follow Keras's recurrence (its first step copies the weight, later
# ones avg = m * avg + (1 - m) * weight) from where the phase started it.
EMA_PROBE = r"""
import json
import keras
import numpy as np

class EmaProbe(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.phases = []

    def _pair(self):
        var = next(v for v in self.model.trainable_variables
                   if v.path.endswith("predictions/kernel"))
        slots = {v.name: v for v in self.model.optimizer.variables}
        avg = slots[var.path.replace("/", "_") + "_average"]
        return np.array(var.value, np.float64), np.array(avg.value, np.float64)

    def on_train_begin(self, logs=None):
        raw, avg = self._pair()
        self.phases.append(dict(start_raw=raw, start_avg=avg, steps=[],
                                iterations=int(self.model.optimizer.iterations)))

    def on_train_batch_end(self, batch, logs=None):
        self.phases[-1]["steps"].append(
            (int(self.model.optimizer.iterations), *self._pair()))

    def report(self, momentum):
        out = []
        for phase in self.phases:
            expected = phase["start_avg"]
            errors, gaps = [], []
            for iterations, raw, avg in phase["steps"]:
                m = 0.0 if iterations == 1 else momentum
                expected = m * expected + (1 - m) * raw
                errors.append(float(np.abs(avg - expected).max()))
                gaps.append(float(np.abs(avg - raw).max()))
            out.append(dict(
                first_iteration=phase["iterations"], steps=len(phase["steps"]),
                start_gap=float(np.abs(phase["start_avg"] - phase["start_raw"]).max()),
                max_error=max(errors), last_gap=gaps[-1],
                last_scale=float(np.abs(phase["steps"][-1][1]).max())))
        return out
"""


BF16 = r"""
import json, sys
import numpy as np
import shopee_tpu
from shopee_tpu.config import RunConfig
from shopee_tpu.training import train

acc = shopee_tpu.connect(mixed_precision="mixed_bfloat16")
cfg = RunConfig.load(sys.argv[2])
first = train(cfg, accelerator=acc, time_limit=1e-3, verbose=0)  # stops after epoch 1
second = train(cfg, accelerator=acc, verbose=0)  # a new model, from the checkpoint
model = second.model
x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
conv = next(l for l in model.layers if "conv" in type(l).__name__.lower())
print("RESULT " + json.dumps(dict(
    summary=acc.summary, first=first.metrics, second=second.metrics,
    history=second.history, conv_compute=conv.compute_dtype,
    conv_variable=conv.variable_dtype,
    # Float variables only: the normalization layer's sample count is an integer.
    weights=sorted({str(w.dtype) for w in model.get_weights() if w.dtype.kind == "f"}),
    probs_dtype=str(model.predict_on_batch(x).dtype),
    probs_sum=float(model.predict_on_batch(x).sum(1).mean()))))
"""


# The EMA probe's fine-tune (float32), then the mixed_bfloat16 run: one JAX child
# for both (its imports and JAX start cost more than either tiny run).
EMA_RUN = r"""
import sys
from shopee_tpu.config import RunConfig
from shopee_tpu.training import train
probe = []
def make_probe():
    probe.append(EmaProbe())
    return probe[-1]
result = train(RunConfig.load(sys.argv[1]), verbose=0, callbacks=[make_probe])
print("RESULT " + json.dumps(dict(metrics=result.metrics,
                                  phases=probe[0].report(0.9)), default=str))
"""


@pytest.fixture(scope="module")
def ema_then_bfloat16(digits_records, tmp_path_factory):
    """Two tiny-cnn runs in one 8-device JAX child: the EMA probe's fine-tune in
    float32 (train() connects with the config's precision), then mixed_bfloat16
    (connect() sets the policy) trained and resumed."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("ema_bf16")
    # The new optimizer's EMA averages start from the frozen phase's weights; on
    # JAX an average sharing its weight's buffer would be donated twice a step.
    RunConfig.preset("photo-finetune").override(
        f"data.train={digits_records['train']}",
        f"out_dir={root / 'ft'}",
        *TINY,
        "batch_size=4",
        "plan.images_seen=0",
        "plan.freeze_epochs=1",
        "epochs=2",
        "steps_per_epoch=4",
        "optim.steps_per_execution=1",
        "optim.ema=true",
        "optim.ema_momentum=0.9",
    ).save(str(root / "ema.json"))
    # 184 records / global batch 16 = 11 steps, not a multiple of 4: the epoch is
    # rounded to 8 steps so each of its two calls runs 4. The dtype plumbing (the
    # policy, float32 pixels, softmax and master weights, a resume) is the same for
    # every backbone: tiny-cnn, where the EfficientNet's compile costs minutes.
    shopee_b0_tiny(
        digits_records,
        root / "run",
        "model.backbone=tiny-cnn",
        "epochs=2",
        "batch_size=2",
        "optim.steps_per_execution=4",
    ).save(root / "bf16.json")
    script = root / "ema_bf16.py"
    script.write_text(EMA_PROBE + EMA_RUN + BF16)
    done = subprocess.run(
        [sys.executable, str(script), str(root / "ema.json"), str(root / "bf16.json")],
        env=jax_env(8),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    results = results_of(done.stdout)
    assert len(results) == 2, done.stdout[-3000:]
    return dict(ema=results[0], bf16=results[1])


@pytest.mark.slow
@pytest.mark.xdist_group("ema_bf16")  # one worker runs the fixture's child
@pytest.mark.long
def test_mixed_bfloat16_on_jax_trains_and_resumes(ema_then_bfloat16):
    r = ema_then_bfloat16["bf16"]
    assert "precision=mixed_bfloat16" in r["summary"]
    assert (r["conv_compute"], r["conv_variable"]) == ("bfloat16", "float32")
    assert r["weights"] == ["float32"]  # checkpoints hold float32 master weights
    assert r["probs_dtype"] == "float32"  # the softmax stays float32
    assert abs(r["probs_sum"] - 1) < 1e-5
    assert (
        r["first"]["epochs_completed"] == 1
        and "time limit" in (r["first"]["stop_reason"])
    )
    assert r["second"]["finished"] and r["second"]["epochs_completed"] == 2
    assert (r["second"]["steps_per_epoch"], r["second"]["steps_per_execution"]) == (
        8,
        4,
    )
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert [h["iterations"] for h in r["history"]] == [8, 16]
    assert all(np.isfinite(h["val_loss"]) for h in r["history"])


@pytest.mark.slow
@pytest.mark.xdist_group("ema_bf16")  # one worker runs the fixture's child
@pytest.mark.long
def test_ema_follows_its_recurrence_across_the_unfrozen_boundary_on_jax(
    ema_then_bfloat16,
):
    # After every step the average equals the recurrence computed from the raw
    # weights' trajectory, and differs from the raw weights.
    r = ema_then_bfloat16["ema"]
    assert r["metrics"]["finished"] and r["metrics"]["epochs_completed"] == 2
    frozen, unfrozen = r["phases"]
    assert (frozen["first_iteration"], frozen["steps"]) == (0, 4)
    # The unfrozen phase's optimizer continues the step count, and its averages
    # start as copies of the weights the frozen phase left.
    assert (unfrozen["first_iteration"], unfrozen["steps"]) == (4, 4)
    assert unfrozen["start_gap"] == 0.0
    for phase in (frozen, unfrozen):
        assert phase["max_error"] < 1e-6 * max(1.0, phase["last_scale"]), phase
        # 0.9 momentum over 4 steps: the average lags the moving weights.
        assert phase["last_gap"] > 1e-4, phase


@pytest.mark.parametrize(
    "asked, explicit, records, expected",
    [
        (32, None, 184, (5, 5)),  # an epoch shorter than one call: one call
        (32, None, 33 * 32, (32, 32)),  # rounded down to whole calls
        (32, None, 100 * 32, (96, 32)),
        (4, None, 11 * 16, (8, 4)),
        (32, 40, 10_000, (40, 20)),  # explicit steps kept; the call divides them
        (32, 31, 10_000, (31, 31)),
        (32, 37, 10_000, (37, 1)),
        (1, None, 184, (11, 1)),
    ],
)
def test_steps_per_execution_divides_the_epoch(asked, explicit, records, expected):
    cfg = RunConfig().override(
        f"optim.steps_per_execution={asked}", f"steps_per_epoch={explicit}"
    )
    batch = 16 if asked in (4, 1) else 32
    assert _epoch_steps(cfg, records, batch, verbose=0) == expected
