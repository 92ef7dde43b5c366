"""``shopee-b0`` … ``shopee-b7``: the Shopee Product Detection TPU baseline.

EfficientNet-B{n} from ImageNet weights at its native size, Adam with the Kaggle
TPU notebook's ramp / sustain / exponential-decay schedule (its peak scaled by the
replicas), label smoothing, flips, bfloat16 on the TPU::

    shopee-tpu train --preset shopee-b3 --set data.train=/kaggle/input/my-records
"""

from __future__ import annotations

from shopee_tpu.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from shopee_tpu.models.efficientnet_scaling import OFFICIAL

# EfficientNet's native input sizes, from the official scaling table.
SIZES = {n: resolution for n, (_, _, resolution, _) in OFFICIAL.items()}
# Per-replica batches that fit a 16 GB TPU v5e chip in bfloat16 (B6 at 512 px fits
# 32 per 16 GB core; B7 needs less).
BATCH = {0: 64, 1: 64, 2: 48, 3: 32, 4: 32, 5: 16, 6: 16, 7: 8}


def get_config(n: int) -> RunConfig:
    return RunConfig(
        name=f"shopee-b{n}",
        data=DataConfig(image_size=SIZES[n]),
        model=ModelConfig(backbone=f"efficientnet-b{n}", weights="imagenet"),
        optim=OptimConfig(
            optimizer="adam",
            learning_rate=5e-5,
            scale_lr=True,
            schedule="ramp",
            warmup_epochs=5,
            lr_start=1e-5,
            lr_min=1e-5,
            decay=0.8,
            label_smoothing=0.1,
            steps_per_execution=32,
        ),
        augment=AugmentConfig(flip_lr=True),
        epochs=15,
        batch_size=BATCH[n],
        out_dir=f"runs/shopee-b{n}",
        mixed_precision=True,
    )
