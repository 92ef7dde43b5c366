"""``shopee-tpu bench ablation``: what each choice of the ``photo`` preset gains.

On the tuning split of ``bench accuracy``'s photo task (a seed's crops, test crops
from held-out regions of the tuning photographs: choices are made there, never on
the final split), it trains the full ``photo`` preset and then the preset with one choice
undone at a time, and reports each variant's held-out accuracy, time and
difference to the full preset. The README's table comes from this command; until
a ``sweep`` command exists, this is the way to rerun it.

A single seed's test set holds 400 crops, so a difference below about 0.03 is
within noise: run several seeds (``--seed``) before trusting small gaps.
"""

from __future__ import annotations

import os
import tempfile

from shopee_tpu.bench.accuracy import make_task, run_ours

# (name, --set overrides that undo one choice of the photo preset)
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("photo preset", ()),
    ("no progressive resizing", ("plan.sizes=",)),
    (
        "with MixUp 0.2/CutMix 1.0 on half the batches",
        ("augment.mixup=0.2", "augment.cutmix=1.0", "augment.mix_prob=0.5"),
    ),
    ("no random resized crop", ("augment.resized_crop=0",)),
    (
        "no colour jitter",
        ("augment.brightness=0", "augment.contrast=0", "augment.saturation=0"),
    ),
    ("no label smoothing", ("optim.label_smoothing=0",)),
    ("no stochastic depth", ("model.drop_connect_rate=0",)),
    ("Adam, no weight decay", ("optim.optimizer=adam", "optim.weight_decay=0")),
    ("no EMA", ("optim.ema=false",)),
    ("BatchNorm momentum 0.99", ("model.batchnorm_momentum=0.99",)),
    ("half the epochs", ("plan.images_seen=24000",)),
    ("EfficientNet-B0 backbone", ("model.backbone=efficientnet-b0",)),
    ("no TTA", ("predict.tta=identity",)),
    ("flip TTA only", ("predict.tta=identity,flip_lr",)),
)


def run_variants(
    variants, *, seed: int, quick: bool, out: str | None = None
) -> list[dict]:
    """Trains each ``(name, sets)`` variant on the seed's task; one row each."""
    out = out or tempfile.mkdtemp(prefix="bench-ablation-")
    task = make_task(
        os.path.join(out, f"task-{seed}"), seed, split="tuning", size=64, quick=quick
    )
    extra = ()
    if quick:  # a smoke run: one epoch of the smallest model
        extra = ("epochs=1", "plan.images_seen=0", "model.backbone=tiny-cnn")
    rows = []
    for i, (name, sets) in enumerate(variants):
        result = run_ours(
            task,
            os.path.join(out, f"v{i:02d}-{seed}"),
            seed=seed,
            preset="photo",
            sets=extra + sets,
        )
        rows.append({"variant": name, "sets": list(sets), **result})
    return rows


def run(args) -> dict:
    """``args``: ``quick``, ``seed``, ``out``."""
    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", None) or 0)
    variants = VARIANTS[:2] if quick else VARIANTS
    rows = run_variants(
        variants, seed=seed, quick=quick, out=getattr(args, "out", None)
    )
    base = rows[0]["test_accuracy"]
    for row in rows:
        row["change_vs_preset"] = round(row["test_accuracy"] - base, 4)
    return {"benchmark": "ablation", "quick": quick, "seed": seed, "rows": rows}
