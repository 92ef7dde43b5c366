"""``shopee-tpu bench accuracy``: held-out accuracy on real photographs, ours against
what a competent Keras user writes (``shopee_tpu.bench.peer``), over several seeds.

The task (``shopee_tpu.data.samples.photos``): each class is one real photograph bundled
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
  the same ImageNet EfficientNet-Lite0 as the Keras transfer-learning guide does.

The same conditions for both contenders:

* **the same images**: every training crop (neither holds any out);
* **the same selection rule**: each keeps its final weights (ours: the last
  epoch's weight average, part of its recipe);
* **the same budget**: one wall time per setting (``Setting.budget``), from the
  contender's start to the end of its prediction, records included. Ours passes
  what is left of it, less a reserve for what follows training, to
  ``train(time_limit=...)``, which plans its epochs to fit. The peer trains a
  fixed number of epochs, as a user sets it from an earlier run: a short run of
  its recipe before the seeds (``calibrate_peer``, outside every budget) sets
  how many of the recipe's epochs fit, and its ``StopBefore`` callback stops it
  before an epoch that would eat into its reserve should it run slower. A side
  may end at most ``MARGIN`` of the budget past it (the report says whether
  each did);
* **alternating order**: the peer runs first on even seeds, ours on odd ones.

The report gives every run, and per setting the mean and standard deviation over
the seeds of both sides' accuracy, of the gain and of the time ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shopee_tpu import fs
from shopee_tpu.bench import mean_std, round_orders, seeds_from
from shopee_tpu.bench.peer import PeerRecipe, run_peer
from shopee_tpu.config import RunConfig
from shopee_tpu.data.read.pipeline import load_dataset, read_ids_labels
from shopee_tpu.data.samples.photos import make_photo_dataset
from shopee_tpu.data.write.records import write_records_from_csv
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
# How far past the budget a contender may end, as a share of it: each side's
# reserve is sized for its prediction on the reference machine, and a stop comes
# at an epoch's end, so a slower prediction than planned shows up here.
MARGIN = 0.03
QUICK_BUDGET = 3600.0  # --quick: a smoke run of the code; never binds
# Of the budget, kept free when the peer's epoch count is set: an epoch may run a
# little slower than the calibration's.
CALIBRATION_SAFETY = 0.02
CONTENDERS = ("peer", "ours")


@dataclass(frozen=True)
class Setting:
    """One side-by-side: our preset against the peer, at one image size.

    ``budget``: seconds of wall time for each contender; ``reserve_ours`` and
    ``reserve_peer``: seconds of it each keeps for what follows its training
    (ours: the end of ``train`` and the preset's TTA; the peer: flip TTA).
    docs/benchmarks.md says how each figure was chosen.
    """

    preset: str
    image_size: int
    pretrained: bool
    budget: float
    reserve_ours: float
    reserve_peer: float
    peer: PeerRecipe
    quick_sets: tuple[str, ...]  # --quick: a smoke run of the code
    # --quick's peer: from scratch, MobileNet (v1), the keras.applications model
    # cheapest to trace (its step is traced twice: the calibration, the run).
    quick_peer: PeerRecipe


SETTINGS = {
    "scratch": Setting(
        "photo", 64, False, 300.0, 25.0, 15.0,
        PeerRecipe("EfficientNetB0", epochs=30, learning_rate=3e-3),
        ("epochs=2", "plan.images_seen=0", "plan.min_epochs=1", "model.backbone=tiny-cnn"),
        PeerRecipe("MobileNet", epochs=2, learning_rate=3e-3),
    ),
    "pretrained": Setting(
        "photo-lite0", 128, True, 210.0, 30.0, 20.0,
        PeerRecipe(epochs=12, learning_rate=1e-4, head_epochs=2),
        ("epochs=2", "plan.images_seen=0", "plan.min_epochs=1", "plan.freeze_epochs=1"),
        PeerRecipe(epochs=2, learning_rate=1e-4, head_epochs=1),
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
    budget: float | None = None,
    reserve: float = 0.0,
) -> dict:
    """Records, ``train`` with the preset, ``predict`` with its TTA; accuracy, time.

    Ours trains on every training image (``data.valid_fraction=0``) and keeps its
    last epoch (the EMA weights). Within ``budget`` seconds from this call's start:
    ``train`` gets what is left of it less ``reserve``, kept for what follows.
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
    began = time.perf_counter()
    limit = None if budget is None else budget - reserve - (began - start)
    result = train(cfg, time_limit=limit, verbose=0)
    trained = time.perf_counter()
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
    m, end = result.metrics, time.perf_counter()
    return {
        "test_accuracy": round(float((np.argmax(probs, -1) == labels).mean()), 4),
        "wall_time_sec": round(end - start, 1),
        "cpu_time_sec": round(time.process_time() - cpu, 1),
        "records_sec": round(began - start, 1),
        "train_sec": round(trained - began, 1),
        "predict_sec": round(end - trained, 1),
        "train_time_limit_sec": None if limit is None else round(limit, 1),
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


def peer_epochs_for(budget: float, short: dict, recipe: PeerRecipe, pretrained: bool):
    """How many of ``recipe``'s epochs fit ``budget``, from ``short``: the peer's
    result on a short run of its recipe (``calibrate_peer``).

    Every epoch is taken to last as long as the last one of the short run (a
    steady epoch of the slowest phase: all layers, when pretrained); the traced
    first epoch of each fit adds what it took beyond that; the setup and the
    prediction come on top, with ``CALIBRATION_SAFETY`` of the budget kept free.
    At least one epoch of each phase; at most the recipe's count.
    """
    seconds = short["epoch_sec"]
    steady = seconds[-1]
    traced = max(0.0, sum(seconds[:-1]) - steady * (len(seconds) - 1))
    fixed = short["setup_sec"] + short["after_training_sec"] + traced
    fits = int((budget * (1 - CALIBRATION_SAFETY) - fixed) // max(steady, 1e-6))
    least = recipe.head_epochs + 1 if pretrained else 1
    return max(least, min(recipe.epochs, fits)), fits


def calibrate_peer(
    setting: Setting, task: dict, recipe: PeerRecipe, *, seed: int, budget: float
) -> dict:
    """The peer's epoch count for ``budget``, as a user sets it from an earlier
    run: a short run of its recipe on the first seed's task, outside every
    budget, with one traced and one steady epoch of its last phase (after one
    epoch of the head, when pretrained)."""
    head = min(recipe.head_epochs, 1) if setting.pretrained else 0
    short = dataclasses.replace(recipe, epochs=head + 2, head_epochs=head)
    result = run_peer(task, seed=seed, pretrained=setting.pretrained, recipe=short)
    epochs, fits = peer_epochs_for(budget, result, recipe, setting.pretrained)
    keys = ("epoch_sec", "setup_sec", "after_training_sec", "wall_time_sec")
    return {"epochs": epochs, "epochs_that_fit": fits, **{k: result[k] for k in keys}}


def order(seed: int) -> list[str]:
    """Who runs first: the peer on even seeds, ours on odd ones."""
    return round_orders(list(CONTENDERS), seed + 1)[seed]


def run_in_order(contenders: dict[str, Callable[[], dict]], seed: int) -> dict:
    """Runs the contenders one after the other in ``order(seed)``; each result gets
    ``started_sec``, its start in seconds after the first one's."""
    results, first = {}, time.perf_counter()
    for name in order(seed):
        began = round(time.perf_counter() - first, 1)
        results[name] = {**contenders[name](), "started_sec": began}
    return results


def within(wall: float, budget: float | None) -> bool:
    """A contender kept the budget: it ended at most ``MARGIN`` of it past it."""
    return budget is None or wall <= budget * (1 + MARGIN)


def compare(
    setting: Setting,
    task: dict,
    out: str,
    *,
    seed: int,
    budget: float | None,
    peer: PeerRecipe,
    sets: tuple[str, ...] = (),
) -> dict:
    """One seed of one setting: both contenders within the same budget, in
    ``order(seed)``."""
    results = run_in_order(
        {
            "peer": lambda: run_peer(
                task,
                seed=seed,
                pretrained=setting.pretrained,
                recipe=peer,
                budget=budget,
                reserve=setting.reserve_peer,
            ),
            "ours": lambda: run_ours(
                task,
                out,
                seed=seed,
                preset=setting.preset,
                sets=sets,
                budget=budget,
                reserve=setting.reserve_ours,
            ),
        },
        seed,
    )
    for side in results.values():
        side["within_budget"] = within(side["wall_time_sec"], budget)
    them, ours = results["peer"], results["ours"]
    # The peer's flip TTA counts: it beat plain prediction on the tuning split.
    return {
        "seed": seed,
        "order": order(seed),
        "budget_sec": budget,
        "peer": them,
        "ours": ours,
        "peer_accuracy": them["test_accuracy_flip_tta"],
        "gain": round(ours["test_accuracy"] - them["test_accuracy_flip_tta"], 4),
        "time_ratio": round(ours["wall_time_sec"] / them["wall_time_sec"], 3),
    }


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation (over seeds; 0 for one seed) of each figure, and
    whether every contender kept the budget."""
    return {
        "peer_accuracy": mean_std(r["peer_accuracy"] for r in runs),
        "ours_accuracy": mean_std(r["ours"]["test_accuracy"] for r in runs),
        "gain": mean_std(r["gain"] for r in runs),
        "time_ratio": mean_std(r["time_ratio"] for r in runs),
        "all_within_budget": all(
            r[side]["within_budget"] for r in runs for side in CONTENDERS
        ),
    }


def run(args) -> dict:
    """``args``: ``quick``, ``seeds`` (or ``seed``), ``split``, ``setting``, ``out``,
    ``budget`` (seconds; 0: none), ``sets`` (ours) and ``peer_sets``."""
    quick = bool(getattr(args, "quick", False))
    seeds = seeds_from(args, [0, 1, 2])
    split = getattr(args, "split", None) or "final"
    out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="bench-accuracy-")
    report = {"benchmark": "accuracy", "quick": quick, "split": split, "seeds": seeds}
    report["photos"] = list(SPLITS[split][:4] if quick else SPLITS[split])
    report["margin"] = MARGIN
    report["settings"] = {}
    for name in _settings(getattr(args, "setting", None)):
        setting = SETTINGS[name]
        size = 64 if quick else setting.image_size
        budget = _budget(getattr(args, "budget", None), setting, quick)
        idle = quick and getattr(args, "budget", None) is None
        peer = peer_recipe(
            setting.quick_peer if quick else setting.peer,
            getattr(args, "peer_sets", None) or (),
        )
        sets = (setting.quick_sets if quick else ()) + tuple(
            getattr(args, "sets", None) or ()
        )
        runs, calibration = [], None
        for seed in seeds:
            where = os.path.join(out, f"{split}-{name}-{seed}")
            task = make_task(
                os.path.join(where, "task"), seed, split=split, size=size, quick=quick
            )
            # --quick's hour never binds: no epoch count to set.
            if budget is not None and calibration is None and not idle:
                calibration = calibrate_peer(
                    setting, task, peer, seed=seed, budget=budget
                )
                peer = dataclasses.replace(
                    peer,
                    epochs=calibration["epochs"],
                    steady_epoch_sec=calibration["epoch_sec"][-1],
                )
            runs.append(
                compare(
                    setting, task, where, seed=seed, budget=budget, peer=peer, sets=sets
                )
            )
        report["settings"][name] = {
            "preset": setting.preset,
            "image_size": size,
            "budget_sec": budget,
            "reserve_sec": {"ours": setting.reserve_ours, "peer": setting.reserve_peer},
            "ours_sets": list(sets),
            "peer_calibration": calibration,
            "peer_recipe": dataclasses.asdict(peer),
            "runs": runs,
            **summarize(runs),
        }
    return report


def peer_recipe(base: PeerRecipe, sets) -> PeerRecipe:
    """``base`` with ``field=value`` overrides (``--peer-set epochs=40``).

    Raises:
        ValueError: An unknown field or a value of the wrong type (named).
    """
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(PeerRecipe)}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--peer-set {item!r}: expected FIELD=VALUE, FIELD one of "
                f"{', '.join(fields)}"
            )
        kind = type(getattr(base, key))
        try:
            changes[key] = kind(text)
        except ValueError:
            raise ValueError(
                f"--peer-set {item!r}: {key} takes a {kind.__name__}"
            ) from None
    return dataclasses.replace(base, **changes)


def _budget(given: float | None, setting: Setting, quick: bool) -> float | None:
    if given is None:
        return QUICK_BUDGET if quick else setting.budget
    if given < 0:
        raise ValueError(f"--budget {given}: expected seconds >= 0 (0: no budget)")
    return float(given) or None


def _settings(text: str | None) -> list[str]:
    if text in (None, "both"):
        return list(SETTINGS)
    if text not in SETTINGS:
        raise ValueError(f"--setting {text!r}: expected scratch, pretrained or both")
    return [text]
