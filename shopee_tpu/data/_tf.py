"""TensorFlow for graph code: imported with a plain statement, not importlib.

Autograph converts every function a ``tf.data`` map calls; it cannot convert
``importlib.import_module`` and prints a warning for each traced function. The
functions here use ``tf.cond``/``tf.switch_case`` explicitly, so nothing is lost.
"""

from __future__ import annotations


def tf():
    """The ``tensorflow`` module, or an ImportError that says how to install it."""
    try:
        import tensorflow
    except ImportError:
        from shopee_tpu.utils import require_tensorflow

        return require_tensorflow()
    return tensorflow
