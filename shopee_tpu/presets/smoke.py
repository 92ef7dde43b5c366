"""``smoke``: the notebooks' SMOKE setting, a notebook's whole path in seconds on 2
CPU cores and still well above chance on the digits::

    shopee-tpu train --preset smoke --set data.train=records/

The demo recipe on ``tiny-cnn`` for 4 epochs, with the raw weights at a gentler
learning rate: after so few steps an EMA would still sit near its random start.
"""

from __future__ import annotations

from shopee_tpu.config import RunConfig
from shopee_tpu.presets import demo


def get_config() -> RunConfig:
    base = demo.get_config()
    return base.replace(
        name="smoke",
        model=base.model.replace(backbone="tiny-cnn"),
        optim=base.optim.replace(ema=False, learning_rate=0.005),
        epochs=4,
        out_dir="runs/smoke",
    )
