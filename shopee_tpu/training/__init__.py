"""Training: ``train(config)`` (``loop``) and its keyword options (``options``), its
callbacks, the plan of its epochs and phases, the checks on its validation figures,
and its report.

Importing this package starts neither Keras nor TensorFlow: ``train()`` connects to
the hardware (``shopee_tpu.connect``) before anything imports them.
"""

from shopee_tpu.training.loop import TrainResult, train
from shopee_tpu.training.options import SingleRunOptions, TrainOptions

__all__ = ["SingleRunOptions", "TrainOptions", "TrainResult", "train"]
