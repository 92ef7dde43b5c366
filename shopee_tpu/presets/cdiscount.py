"""``cdiscount``: the Cdiscount Image Classification 3rd-place recipe.

180 px, Nadam with a step learning rate (1e-4, then 2e-5 from epoch 10, 4e-6 from
epoch 13), label smoothing 0.1, flips as the only augmentation, no dropout after
the pooling, and flip TTA averaged per product::

    shopee-tpu cdiscount prepare train.bson --out rec --dedup
    shopee-tpu train --preset cdiscount --set data.train=rec --out run
"""

from __future__ import annotations

from shopee_tpu.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PredictConfig,
    RunConfig,
)


def get_config() -> RunConfig:
    return RunConfig(
        name="cdiscount",
        data=DataConfig(image_size=180, valid_fraction=0.05),
        model=ModelConfig(backbone="efficientnet-b0", weights="imagenet", dropout=0.0),
        optim=OptimConfig(
            optimizer="nadam",
            learning_rate=1e-4,
            schedule="step",
            step_epochs=(10, 13),
            step_values=(1e-4, 2e-5, 4e-6),
            label_smoothing=0.1,
        ),
        augment=AugmentConfig(flip_lr=True),
        predict=PredictConfig(tta=("identity", "flip_lr"), reduce="mean"),
        epochs=15,
        batch_size=64,
        out_dir="runs/cdiscount",
    )
