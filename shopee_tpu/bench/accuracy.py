"""``shopee-tpu bench accuracy``: held-out accuracy on real photographs, ours against
what a competent Keras user writes (``shopee_tpu.bench.peer``), over several seeds.

The task (``shopee_tpu.data.photos``): each class is one real photograph bundled
with scikit-image or scikit-learn; samples are random crops with scale, position
and flip jitter; the test crops come from a band of every photograph that no
training crop touches. Each seed draws other edges and other crops.

Two splits of the photographs keep tuning apart from scoring:

* ``tuning`` (``TUNING_PHOTOS``): every recipe choice, ours and the peer's, is
  made on it (``--split tuning``);
* ``final`` (``FINAL_PHOTOS``, the default): other photographs, hence other
  regions; only reported, never tuned on.

Two settings:

* ``scratch``: 64 px, the ``photo`` preset against ``keras.applications``
  EfficientNet-B0 from random weights;
* ``pretrained``: 128 px, the ``photo-lite0`` preset against the peer fine-tuning
  the same ImageNet EfficientNet-Lite0.

For each seed the peer runs first and ours gets at most the wall time it took.
Both read the same JPEG files; each side's time covers everything after the task
exists (records, training, prediction). The report gives every run, and per
setting the mean and standard deviation over the seeds of both sides' accuracy,
of the gain and of the time ratio.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from shopee_tpu import fs
from shopee_tpu.bench import mean_std, seeds_from
from shopee_tpu.bench.peer import run_peer
from shopee_tpu.config import RunConfig
from shopee_tpu.data.photos import make_photo_dataset
from shopee_tpu.data.pipeline import load_dataset, read_ids_labels
from shopee_tpu.data.records import write_records_from_csv
from shopee_tpu.inference.tta import predict
from shopee_tpu.training import train

# Five colour photographs and three grayscale ones each.
TUNING_PHOTOS = ("astronaut", "chelsea", "hubble", "retina", "china")
TUNING_PHOTOS += ("camera", "moon", "grass")
FINAL_PHOTOS = ("coffee", "rocket", "ihc", "motorcycle", "flower")
FINAL_PHOTOS += ("coins", "brick", "gravel")
SPLITS = {"tuning": TUNING_PHOTOS, "final": FINAL_PHOTOS}
TASK = dict(train_per_class=120, test_per_class=40)
QUICK_TASK = dict(train_per_class=24, test_per_class=8)


@dataclass(frozen=True)
class Setting:
    """One side-by-side: our preset against the peer, at one image size."""

    preset: str
    image_size: int
    pretrained: bool
    peer_epochs: int
    peer_learning_rate: float  # docs/benchmarks.md says how each was chosen
    quick_sets: tuple[str, ...]  # --quick: a smoke run of the code


SETTINGS = {
    "scratch": Setting(
        "photo", 64, False, 30, 3e-3,
        ("epochs=1", "plan.images_seen=0", "plan.min_epochs=1", "model.backbone=tiny-cnn"),
    ),
    "pretrained": Setting(
        "photo-lite0", 128, True, 12, 1e-3,
        ("epochs=1", "plan.images_seen=0", "plan.min_epochs=1", "plan.freeze_epochs=0"),
    ),
}  # fmt: skip


def make_task(out: str, seed: int, *, split: str, size: int, quick: bool) -> dict:
    """The photo task of ``split`` for ``seed`` in the Shopee layout under ``out``."""
    summary = os.path.join(out, "summary.json")
    if fs.exists(summary):
        return fs.read_json(summary, what="photo task summary")
    photos = SPLITS[split][:4] if quick else SPLITS[split]
    counts = QUICK_TASK if quick else TASK
    info = make_photo_dataset(out, classes=photos, image_size=size, seed=seed, **counts)
    fs.write_text(summary, json.dumps(info, indent=1))
    return info


def run_ours(
    task: dict,
    out: str,
    *,
    seed: int,
    preset: str,
    sets: tuple[str, ...] = (),
    time_limit: float | None = None,
) -> dict:
    """Records, ``train`` with the preset, ``predict`` with its TTA; accuracy, time.

    Like the peer's final model, ours trains on every training image
    (``data.valid_fraction=0``) and keeps its last epoch (the EMA weights).
    """
    start, cpu = time.perf_counter(), time.process_time()
    records = _records(task, os.path.join(out, "records"))
    cfg = RunConfig.preset(preset).override(
        f"data.train={records['train']}",
        f"data.image_size={task['image_size']}",
        f"seed={seed}",
        f"out_dir={os.path.join(out, 'run')}",
        "data.valid_fraction=0",
        *sets,
    )
    limit = None if time_limit is None else time_limit - (time.perf_counter() - start)
    result = train(cfg, time_limit=limit, verbose=0)
    test = load_dataset(
        records["test"],
        image_size=result.model.input_shape[1],
        batch_size=64,
        training=False,
    )
    _, probs = predict(
        result.model, test, tta=cfg.predict.tta, reduce=cfg.predict.reduce
    )
    labels = read_ids_labels(records["test"])["label"].to_numpy()
    m = result.metrics
    return {
        "test_accuracy": round(float((np.argmax(probs, -1) == labels).mean()), 4),
        "wall_time_sec": round(time.perf_counter() - start, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "epochs": m["epochs_completed"],
        "epochs_planned": m["epochs"],
        "stop_reason": m["stop_reason"],
        "train_images": m["train_images"],
    }


def _records(task: dict, root: str) -> dict:
    options = dict(image_size=None, resize="square", quality=95, workers=1, seed=0)
    out = {"train": os.path.join(root, "train"), "test": os.path.join(root, "test")}
    write_records_from_csv(
        task["train_csv"], task["train_images"], out["train"], shards=8, **options
    )
    write_records_from_csv(
        task["test_labels_csv"],
        task["test_images"],
        out["test"],
        shards=1,
        label_map=os.path.join(out["train"], "manifest.json"),
        **options,
    )
    return out


def compare(setting: Setting, task: dict, out: str, *, seed: int, quick: bool) -> dict:
    """One seed of one setting: the peer, then ours within the peer's wall time."""
    peer = run_peer(
        task,
        seed=seed,
        pretrained=setting.pretrained,
        epochs=1 if quick else setting.peer_epochs,
        learning_rate=setting.peer_learning_rate,
        application="MobileNetV3Small"
        if quick and not setting.pretrained
        else "EfficientNetB0",
    )
    ours = run_ours(
        task,
        out,
        seed=seed,
        preset=setting.preset,
        sets=setting.quick_sets if quick else (),
        time_limit=peer["wall_time_sec"],
    )
    peer_best = max(peer["test_accuracy"], peer["test_accuracy_flip_tta"])
    return {
        "seed": seed,
        "peer": peer,
        "ours": ours,
        "peer_best": peer_best,
        "gain": round(ours["test_accuracy"] - peer_best, 4),
        "time_ratio": round(ours["wall_time_sec"] / peer["wall_time_sec"], 3),
    }


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation (over seeds; 0 for one seed) of each figure."""
    return {
        "peer_accuracy": mean_std(r["peer_best"] for r in runs),
        "ours_accuracy": mean_std(r["ours"]["test_accuracy"] for r in runs),
        "gain": mean_std(r["gain"] for r in runs),
        "time_ratio": mean_std(r["time_ratio"] for r in runs),
    }


def run(args) -> dict:
    """``args``: ``quick``, ``seeds`` (or ``seed``), ``split``, ``setting``, ``out``."""
    quick = bool(getattr(args, "quick", False))
    seeds = seeds_from(args, [0, 1, 2])
    split = getattr(args, "split", None) or "final"
    names = _settings(getattr(args, "setting", None))
    out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="bench-accuracy-")
    report = {"benchmark": "accuracy", "quick": quick, "split": split, "seeds": seeds}
    report["photos"] = list(SPLITS[split][:4] if quick else SPLITS[split])
    report["settings"] = {}
    for name in names:
        setting = SETTINGS[name]
        size = 64 if quick else setting.image_size
        runs = []
        for seed in seeds:
            where = os.path.join(out, f"{split}-{name}-{seed}")
            task = make_task(
                os.path.join(where, "task"), seed, split=split, size=size, quick=quick
            )
            runs.append(compare(setting, task, where, seed=seed, quick=quick))
        report["settings"][name] = {
            "preset": setting.preset,
            "image_size": size,
            "runs": runs,
            **summarize(runs),
        }
    return report


def _settings(text: str | None) -> list[str]:
    if text in (None, "both"):
        return list(SETTINGS)
    if text not in SETTINGS:
        raise ValueError(f"--setting {text!r}: expected scratch, pretrained or both")
    return [text]
