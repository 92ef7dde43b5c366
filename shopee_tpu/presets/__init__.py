"""The recipes this library ships, one file each; ``RunConfig.preset(name)`` returns
one, ``PRESETS`` lists them. Importing this package registers them, and
``import shopee_tpu`` imports it.

Each file's docstring holds the command that runs its recipe. Related presets are
derived with ``replace()``, so each difference is stated once.
"""

from __future__ import annotations

from shopee_tpu.config import PRESETS, register_preset
from shopee_tpu.presets import (
    cdiscount,
    demo,
    photo,
    photo_finetune,
    photo_lite0,
    shopee,
    small_images,
    smoke,
)

__all__ = ["PRESETS"]

for _n in shopee.SIZES:
    register_preset(shopee.get_config(_n))
for _module in (
    cdiscount,
    demo,
    photo,
    photo_finetune,
    photo_lite0,
    small_images,
    smoke,
):
    register_preset(_module.get_config())
