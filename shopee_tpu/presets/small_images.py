"""``small-images``: images of 28 to 64 pixels, grey or colour, from scratch
(Fashion-MNIST, MNIST, CIFAR-sized thumbnails; ``shopee-tpu bench fashion``
scores it, docs/benchmarks.md)::

    shopee-tpu train --preset small-images --set data.train=records/ \\
        --set data.image_size=28 --time-limit 13m

Set ``data.image_size`` to your images' side (32 by default): they train at
the size they are stored at. A ``small-resnet`` (a CIFAR-style residual CNN:
full-resolution stem, three stages, about 75 MFLOPs an image at 28 px) rather
than an EfficientNet, whose depthwise convolutions and five stride-2 stages suit
large photographs; AdamW on a warm-up cosine, label smoothing, an EMA of the
weights; flips, small shifts and cutout (random erasing is what moves small
product images most: Zhong et al. 2017); flip TTA. With ``--time-limit`` the
epoch count is planned to fit the time (``shopee_tpu.training.time_plan``), so
the cosine always completes; without one it trains ``epochs``.
"""

from __future__ import annotations

from shopee_tpu.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    PlanConfig,
    PredictConfig,
    RunConfig,
)
from shopee_tpu.presets import photo


def get_config() -> RunConfig:
    # The photo preset's optimizer (AdamW 3e-3, weight decay 0.05, label
    # smoothing 0.1, warm-up cosine, EMA), over many more steps an epoch.
    base = photo.get_config()
    return base.replace(
        name="small-images",
        data=DataConfig(image_size=32, valid_fraction=0.1, cache=True),
        model=ModelConfig(
            backbone="small-resnet",
            weights=None,
            drop_connect_rate=0.0,
            batchnorm_momentum=0.99,
        ),
        # The photo preset's EMA momentum, 0.99: its average spans about 100
        # steps. At 0.999 a run a time limit plans at 2 epochs (936 steps of 128 on
        # 2 cores in 13 minutes) keeps 0.999 ** 936 = 39 % of its random start.
        optim=base.optim.replace(warmup_epochs=1),
        augment=AugmentConfig(flip_lr=True, shift=0.1, cutout=0.4),
        plan=PlanConfig(),
        predict=PredictConfig(tta=("identity", "flip_lr"), reduce="mean"),
        epochs=30,
        batch_size=128,
        out_dir="runs/small-images",
    )
