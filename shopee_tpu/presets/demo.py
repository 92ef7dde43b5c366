"""``demo``: a small EfficientNet from scratch on scikit-learn's digits, the main job
on 2 CPU cores (``make demo``; docs/benchmarks.md has its figures)::

    shopee-tpu demo

With few steps per epoch a from-scratch model's validation accuracy swings from
epoch to epoch; what steadies it: BatchNorm momentum 0.9, so the moving statistics
keep up with the weights; an EMA of the weights, evaluated and checkpointed in
their place; warmup + cosine; no stochastic depth for a model this small; and a
light zoom/shift augmentation (flips would change what a digit means).
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
        name="demo",
        data=DataConfig(
            image_size=32, valid_fraction=0.1, cache=True, deterministic=True
        ),
        model=ModelConfig(
            backbone="efficientnet-phi-6",
            weights=None,
            drop_connect_rate=0.0,
            dropout=0.0,
            batchnorm_momentum=0.9,
        ),
        optim=OptimConfig(
            optimizer="adam",
            learning_rate=1e-2,
            schedule="cosine",
            warmup_epochs=1,
            lr_start=1e-4,
            lr_min=1e-5,
            label_smoothing=0.1,
            ema=True,
            ema_momentum=0.99,
        ),
        augment=AugmentConfig(flip_lr=False, zoom=0.1, shift=0.06),
        predict=PredictConfig(tta=("identity", "shift_2"), reduce="mean"),
        epochs=22,
        batch_size=32,
        seed=0,
        out_dir="runs/demo",
    )
