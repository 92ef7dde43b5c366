"""Models: our EfficientNet builder, a backbone registry and the compile recipe.

Every model takes float RGB pixels in 0..255 (normalised inside the model) and
outputs float32 softmax probabilities::

    from shopee_tpu.models import build_model, compile_model, describe
    model = build_model("efficientnet-b0", num_classes=42, weights="/kaggle/input/w/efficientnetb0_notop.h5")
    compile_model(model, cfg.optim, steps_per_epoch=500, epochs=12)
    describe(model)        # params and MACs per part

Names are imported lazily, so importing this package does not start Keras before
``shopee_tpu.connect()`` has picked the backend.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "efficientnet": "shopee_tpu.models.efficientnet_builder",
    "scaling": "shopee_tpu.models.efficientnet_scaling",
    "drop_connect_rates": "shopee_tpu.models.efficientnet_scaling",
    "build_model": "shopee_tpu.models.registry",
    "build_from_config": "shopee_tpu.models.registry",
    "input_spec": "shopee_tpu.models.registry",
    "InputSpec": "shopee_tpu.models.registry",
    "available_models": "shopee_tpu.models.registry",
    "supports_any_size": "shopee_tpu.models.registry",
    "compile_model": "shopee_tpu.models.optim",
    "make_schedule": "shopee_tpu.models.optim",
    "make_optimizer": "shopee_tpu.models.optim",
    "make_loss": "shopee_tpu.models.optim",
    "freeze_backbone": "shopee_tpu.models.finetune",
    "unfreeze_backbone": "shopee_tpu.models.finetune",
    "describe": "shopee_tpu.models.summary",
    "load_weights": "shopee_tpu.models.weights.loader",
    "set_preprocessing": "shopee_tpu.models.weights.loader",
    "WeightsError": "shopee_tpu.models.weights.errors",
    "WeightsNotFoundError": "shopee_tpu.models.weights.errors",
    "WeightsUnavailableError": "shopee_tpu.models.weights.errors",
    "KerasHubError": "shopee_tpu.models.kerashub",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
