"""``photo``: real photographs from scratch, for internet-off kernels without
pretrained weights (``shopee-tpu bench accuracy`` scores it; docs/benchmarks.md)::

    shopee-tpu train --preset photo --set data.train=records/

A small EfficientNet with BatchNorm momentum 0.9 and an EMA of the weights (few
steps per epoch, as in the demo); AdamW with warmup + cosine; random resized crops,
flips and mild colour jitter; label smoothing; progressive resizing (small images
first, so early epochs are cheap) and an epoch count from the data size; TTA with
flips and zoomed-in views. Random resized crops show objects larger than whole
images do, so the zoomed-in views (the central 80 %) see them at the training
scale (FixRes).
"""

from __future__ import annotations

from shopee_tpu.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    PredictConfig,
    RunConfig,
)


def get_config() -> RunConfig:
    return RunConfig(
        name="photo",
        data=DataConfig(image_size=64, valid_fraction=0.1, cache=True),
        model=ModelConfig(
            backbone="efficientnet-phi-2",
            weights=None,
            drop_connect_rate=0.1,
            dropout=0.2,
            batchnorm_momentum=0.9,
        ),
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=3e-3,
            weight_decay=0.05,
            label_smoothing=0.1,
            schedule="cosine",
            warmup_epochs=2,
            lr_start=1e-4,
            lr_min=1e-5,
            ema=True,
            ema_momentum=0.99,
        ),
        augment=AugmentConfig(
            flip_lr=True,
            resized_crop=0.25,
            brightness=0.1,
            contrast=0.2,
            saturation=0.2,
        ),
        plan=PlanConfig(images_seen=48000, min_epochs=8, sizes=(32, 48)),
        predict=PredictConfig(
            tta=("identity", "flip_lr", "zoom_80", "flip_lr+zoom_80"), reduce="mean"
        ),
        epochs=60,
        batch_size=32,
        seed=0,
        out_dir="runs/photo",
    )
