"""The static shapes ``tf.data`` declares: ``any_image_size`` leaves a dataset's
image side open, for the one model with an open input side that trains every size
of progressive resizing on TensorFlow CPUs and GPUs (``training.plan``).
"""

from __future__ import annotations

__all__ = ["any_image_size"]


def any_image_size(dataset):
    """``dataset`` with the image side of its first element left open.

    Keras traces its training step once per input signature; batches whose side
    is unknown to the signature share one traced graph across the sizes of
    progressive resizing. The values are unchanged. ``None`` passes through.
    """
    if dataset is None:
        return None
    import tensorflow as tf

    def relax(images, *rest):
        shape = [images.shape[0], None, None, images.shape[-1]]
        return (tf.compat.v1.placeholder_with_default(images, shape), *rest)

    return dataset.map(relax)
