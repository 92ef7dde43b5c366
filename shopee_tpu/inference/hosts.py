"""Prediction over several JAX hosts' devices: the one path that ``predict``,
``predict_run``, k-fold's held-out predictions and the end-of-run report take on a
pod slice.

Keras's ``predict_on_batch`` cannot serve there: it ends in ``np.array(output)``,
and JAX refuses to read an array that spans other hosts' devices. The model runs
as one compiled call over every device instead, its output replicated inside that
call, so every host reads all rows (``multihost.replicated_call``).
"""

from __future__ import annotations

from collections.abc import Sequence

from shopee_tpu import multihost
from shopee_tpu.inference.tta_views import classify_views, view_function

__all__ = ["hosts_call"]


def hosts_call(model, members: Sequence[str] = ("identity",)):
    """The prediction of a model spread over several JAX hosts' devices: the path
    ``predict``, ``predict_run``, k-fold and the end-of-run report take there.

    Every process must make the same calls with the same shapes. Values come back
    through ``multihost.replicated_call``: whole, on every host, in row order.

    Returns:
        ``call(images, *extras, host_rows=False)`` -> ``(probs [b, members, C],
        *extras)`` as numpy. ``images`` is the global batch, the same on every
        host; with ``host_rows=True`` it is this host's rows (each host its own,
        as ``fit`` is fed), and ``extras`` (labels, weights: arrays with the same
        rows) come back in the order of the rows returned.
    """
    import keras

    fns = [view_function(m) for m in members]

    def forward(state, images, *extras):
        trainable, non_trainable = state

        def classify(x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        return (classify_views(fns, images, classify), *extras)

    call = multihost.replicated_call(keras.distribution.distribution(), forward)

    def predict_rows(images, *extras, host_rows: bool = False):
        # The weights as they are now: a model trained further predicts anew.
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )
        return call(state, images, *extras, host_rows=host_rows)

    return predict_rows
