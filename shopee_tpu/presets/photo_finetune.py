"""``photo-finetune``: fine-tuning attached weights on photographs::

    shopee-tpu train --preset photo-finetune --set data.train=records/ \\
        --set model.weights=/kaggle/input/effnet/efficientnet-b0.h5

``model.weights`` is B0's ImageNet file by default, or any weights file from one of
our runs with the same backbone. The head trains alone for two epochs on a frozen
backbone (BatchNorm in inference mode, so its statistics survive), then everything
trains with the backbone at a tenth of the learning rate. The model's native size,
lighter augmentation and fewer epochs than ``photo``: pretrained features need
fewer, gentler steps.
"""

from __future__ import annotations

from shopee_tpu.config import DataConfig, ModelConfig, PlanConfig, RunConfig
from shopee_tpu.presets import photo


def get_config() -> RunConfig:
    base = photo.get_config()
    return base.replace(
        name="photo-finetune",
        data=DataConfig(image_size=None, valid_fraction=0.1, cache=True),
        model=ModelConfig(
            backbone="efficientnet-b0", weights=None, drop_connect_rate=0.2, dropout=0.2
        ),
        optim=base.optim.replace(learning_rate=1e-3, warmup_epochs=1, lr_start=1e-4),
        augment=base.augment.replace(resized_crop=0.35),
        plan=PlanConfig(
            images_seen=24000, min_epochs=4, freeze_epochs=2, backbone_lr=0.1
        ),
        epochs=30,
        out_dir="runs/photo-finetune",
    )
