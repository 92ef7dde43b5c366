"""What ``shopee_tpu.connect()`` builds on: the signs of a TPU VM, and each Keras
backend's device setup (``tensorflow_setup``, ``jax_setup``)."""
