"""``shopee_tpu.predict``: test-time augmentation (TTA), grouped per device.

How the K views of a batch are grouped per compiled model call depends on the
device (``views_per_call="auto"``, the default; see :func:`auto_views_per_call`):

- **TPU and GPU: all views in ONE call.** The views are built on the device with
  ``keras.ops``, concatenated along the batch axis, classified together, and come
  back as ``[batch, views, classes]``: a K times larger batch fills the matrix units,
  with no extra calls, host copies or retracing.
- **CPU: one view per call.** On a CPU a K times larger batch runs slower per image
  (its activations outgrow the caches; ``shopee-tpu bench predict`` compares the
  two, docs/benchmarks.md has the figures), so each view
  is built with ``keras.ops`` and classified by the same compiled one-view call:
  exactly K single-view passes and one trace, whatever K is.

Both give the same probabilities (to float rounding). Under several replicas (a TF
strategy or a JAX ``DataParallel`` distribution) each batch is padded to a multiple
of the replicas, split across them, and the padding is stripped again. On several
JAX hosts every host passes the same batches and gets every row back
(``shopee_tpu.inference.hosts``).

The view names (``identity``, ``flip_lr``, ``shift_2``, ``zoom_90``...) and the
reducers (``mean``, ``geometric``, ``beta``) are described in
``shopee_tpu.inference.tta_views``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from shopee_tpu import multihost
from shopee_tpu.console import known_length, progress_bar
from shopee_tpu.inference.hosts import hosts_call
from shopee_tpu.inference.tta_views import (
    REDUCERS,
    ViewPlan,
    classify_views,
    reduce_views,
    view_function,
)
from shopee_tpu.utils import require_tensorflow

__all__ = [
    "predict",
    "tta_step",
    "auto_views_per_call",
    "device_kind",
    "iter_view_probs",
    "reduce_views",
    "ViewPlan",
    "REDUCERS",
]

ViewsPerCall = int | str | None

# ---------------------------------------------------------------------------
# The batched, compiled model call.


def _tta_model(model, members: Sequence[str]):
    """A keras Model mapping images [b, ...] to probabilities [b, len(members), C]."""
    import keras

    fns = [view_function(m) for m in members]

    class TTAModel(keras.Model):
        def __init__(self, base):
            # float32 so a mixed-precision policy never rounds the pixels before
            # the views are built; the base model casts as it always does.
            super().__init__(dtype="float32", name="tta")
            self.base = base

        def call(self, images, training=False):
            return classify_views(fns, images, lambda x: self.base(x, training=False))

    return TTAModel(model)


def device_kind(model=None) -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: where ``model`` (or the current setup) runs.

    TensorFlow: a ``TPUStrategy`` means TPU, a visible GPU means GPU. JAX: the
    platform of the distribution's devices, else of the default device.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        tf = require_tensorflow()
        strategy = (
            getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        )
        if "TPU" in type(strategy).__name__:
            return "tpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    if backend == "jax":
        import jax

        dist = keras.distribution.distribution()
        devices = dist.device_mesh.devices.flat if dist is not None else jax.devices()
        first = next(iter(devices))  # a jax Device, or Keras's "tpu:0" style name
        platform = str(getattr(first, "platform", first)).split(":")[0].lower()
        return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
            platform, "cpu"
        )
    return "cpu"


def auto_views_per_call(model=None) -> int | None:
    """What ``views_per_call="auto"`` means on this device: ``None`` (all views in
    one call) on TPU and GPU, ``1`` (one view per call) on CPU.

    ``shopee-tpu bench predict`` measures both groupings against K single-view
    passes and reports this choice.
    """
    return None if device_kind(model) in ("tpu", "gpu") else 1


def _resolve(model, views_per_call, members: int) -> int | None:
    """``views_per_call`` as given -> ``None`` (all in one call) or a chunk size < K."""
    if isinstance(views_per_call, str):
        if views_per_call != "auto":
            raise ValueError(
                f"views_per_call must be 'auto', None or a positive int, got "
                f"{views_per_call!r}"
            )
        views_per_call = auto_views_per_call(model)
    if views_per_call is None:
        return None
    if int(views_per_call) < 1:
        raise ValueError(f"views_per_call must be >= 1, got {views_per_call}")
    return None if int(views_per_call) >= members else int(views_per_call)


class _Runner:
    """Calls the TTA models on one numpy batch, with multi-replica distribution.

    ``views_per_call`` (resolved): ``None`` sends every member view in one compiled
    call; ``1`` builds each view with ``keras.ops`` outside the compiled call and
    sends it through one shared one-view call (one trace whatever the views); ``c``
    sends chunks of ``c`` views, one compiled call per chunk.
    """

    def __init__(self, model, plan: ViewPlan, views_per_call: int | None):
        import keras

        k = len(plan.members) if not views_per_call else views_per_call
        self.per_view = k == 1 and len(plan.members) > 1
        if self.per_view:
            self.views = [view_function(m) for m in plan.members]
            chunks = [("identity",)]
        else:
            chunks = [plan.members[i : i + k] for i in range(0, len(plan.members), k)]
        self.backend = keras.backend.backend()
        self.strategy = None
        self.distribution = None
        self.replicas = 1
        if self.backend == "tensorflow":
            strategy = getattr(model, "distribute_strategy", None)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                # Multi-worker strategies would hand each worker only its local
                # replicas' share of a batch (fewer local devices than replicas);
                # there every worker predicts its own batches on its own device.
                local = len(strategy.extended.worker_devices)
                if local == strategy.num_replicas_in_sync:
                    self.strategy = strategy
                    self.replicas = local
        elif self.backend == "jax":
            dist = keras.distribution.distribution()
            if dist is not None:
                mesh = dist.device_mesh
                axis = mesh.axis_names.index(dist.batch_dim_name)
                self.distribution, self.replicas = dist, int(mesh.shape[axis])
        # Several JAX hosts: Keras's predict_on_batch cannot read the output there
        # (see hosts_call), so the views go through the multi-host path.
        self.several_hosts = multihost.spans_hosts(self.distribution)
        if self.strategy is not None:
            with self.strategy.scope():
                self.models = [_tta_model(model, c) for c in chunks]
            self.steps = [self._tf_distributed_step(m) for m in self.models]
        elif self.several_hosts:
            calls = [hosts_call(model, c) for c in chunks]
            self.steps = [lambda x, call=call: call(x)[0] for call in calls]
        else:
            self.models = [_tta_model(model, c) for c in chunks]
            self.steps = [self._plain_step(m) for m in self.models]

    def _plain_step(self, tta_model):
        import keras

        def step(x):
            if self.distribution is not None:
                layout = self.distribution.get_data_layout(x.shape)
                x = keras.distribution.distribute_tensor(x, layout)
            return np.asarray(tta_model.predict_on_batch(x))

        return step

    def _tf_distributed_step(self, tta_model):
        tf = require_tensorflow()
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def run(dist_x):
            return strategy.run(lambda x: tta_model(x, training=False), args=(dist_x,))

        def step(x):
            parts = np.split(np.asarray(x), self.replicas)
            dist_x = strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
            )
            out = strategy.experimental_local_results(run(dist_x))
            return np.concatenate([np.asarray(t) for t in out], axis=0)

        return step

    def __call__(self, images: np.ndarray, pad_to: int) -> np.ndarray:
        """Returns ``[b, members, classes]`` for ``images``; pads to ``pad_to`` rows
        (a multiple of the replicas) so shapes stay fixed, and strips the padding."""
        b = len(images)
        if pad_to > b:
            pad = np.zeros((pad_to - b,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad], axis=0)
        if self.per_view:
            step = self.steps[0]
            images = images.astype(np.float32)  # the views run here, on the host
            outs = [step(view(images)) for view in self.views]
        else:
            outs = [step(images) for step in self.steps]
        out = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        return out[:b]


def _cached_runner(model, plan: ViewPlan, views_per_call: ViewsPerCall) -> _Runner:
    """One runner (and so one traced function) per model, views and grouping:
    calling ``predict`` again does not retrace. The cache is an attribute of the
    model, so it dies with it (a weak-keyed table would keep the model alive: each
    runner holds it); Keras tracks only layers, variables and metrics, and the
    runners are none of these, so the model's weights and config are unchanged."""
    views_per_call = _resolve(model, views_per_call, len(plan.members))
    if not hasattr(model, "shopee_tta_runners"):
        model.shopee_tta_runners = {}
    cache = model.shopee_tta_runners
    key = (plan.members, views_per_call)
    if key not in cache:
        cache[key] = _Runner(model, plan, views_per_call)
    return cache[key]


def tta_step(model, tta: str | Sequence[str], *, views_per_call: ViewsPerCall = "auto"):
    """The compiled call behind ``predict``, for custom loops and benchmarks.

    ``views_per_call`` groups the views as in :func:`predict`.

    Returns:
        A function mapping one numpy image batch ``[b, h, w, c]`` to the member
        views' probabilities ``[b, members, classes]`` (``ViewPlan.parse(tta)``
        gives the member order), padding for replicas internally.
    """
    plan = ViewPlan.parse(tta)
    runner = _cached_runner(model, plan, views_per_call)

    def step(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        r = runner.replicas
        return runner(images, -(-len(images) // r) * r)

    return step


def _to_numpy(t) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def _split_batch(batch):
    if isinstance(batch, tuple | list):
        if len(batch) == 1:
            return batch[0], None
        return batch[0], batch[1]
    if isinstance(batch, dict):
        raise ValueError(
            "predict expects (images, ids) or bare image batches, got a dict with "
            f"keys {sorted(batch)}"
        )
    return batch, None


def _decode_ids(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind in ("O", "S"):
        return np.array(
            [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids],
            dtype=str,
        )
    return ids


def iter_view_probs(
    model,
    dataset: Iterable,
    plan: ViewPlan,
    *,
    views_per_call: ViewsPerCall = "auto",
) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """Yields ``(second element or None, [b, members, classes])`` per batch.

    The second element of ``(images, ids)`` batches is passed through as numpy (ids
    decoded to ``str``), so validation batches ``(images, labels)`` work as well.
    """
    runner = _cached_runner(model, plan, views_per_call)
    if runner.several_hosts:
        # Each batch is a collective: a host that ran out first would leave the
        # others waiting for ever.
        n = known_length(dataset)
        multihost.agree(-1 if n is None else n, "predict: the number of batches")
    largest = 0
    for batch in dataset:
        images, extra = _split_batch(batch)
        images = np.asarray(_to_numpy(images))  # uint8 stays uint8 (fewer bytes)
        if images.ndim != 4:
            raise ValueError(
                f"predict expects image batches [b, h, w, c], got shape {images.shape}"
            )
        b = len(images)
        if b == 0:
            continue
        # Pad a short last batch up to the full batch size: compiled functions (XLA
        # on TPU especially) then see one shape and do not recompile for it.
        r = runner.replicas
        largest = max(largest, -(-b // r) * r)
        probs = runner(images, largest)
        if extra is not None:
            extra = _decode_ids(_to_numpy(extra))
            if len(extra) != b:
                raise ValueError(f"batch has {b} images but {len(extra)} ids")
        yield extra, probs


def predict(
    model,
    dataset: Iterable,
    tta: str | Sequence[str] = ("identity", "flip_lr"),
    reduce: str = "mean",
    beta: float = 0.3,
    *,
    views_per_call: ViewsPerCall = "auto",
    verbose: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Predicts every image of ``dataset`` with test-time augmentation.

    Args:
        model: A Keras model mapping images to class probabilities.
        dataset: ``load_dataset(..., training=False)`` (``(images, ids)`` batches)
            or any iterable of image batches or ``(images, ids)`` pairs.
        tta: View names (see ``shopee_tpu.inference.tta_views``), a list or "a,b,c".
        reduce: ``mean``, ``geometric`` or ``beta``.
        beta: Weight of ``identity`` when ``reduce="beta"``.
        views_per_call: How views are grouped per compiled model call.
            ``"auto"``: all views in one call on TPU and GPU, one view per call on
            CPU (see :func:`auto_views_per_call`). ``None``: all in one call. An
            int: at most this many views per call, e.g. to bound memory (the batch
            the model sees is ``batch * views``). Every grouping gives the same
            probabilities up to float rounding.
        verbose: Show a progress bar.

    Returns:
        ``(ids, probs)``: ids as ``str`` (``None`` for bare image batches) and
        float32 ``probs [n, classes]`` in dataset order, each image exactly once.

    On several JAX hosts (a pod slice) every process calls ``predict`` with the
    same dataset, as it would on one host: each host sends its devices their rows
    of every batch, and every host gets back every row, in dataset order.
    """
    plan = ViewPlan.parse(tta)
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    if reduce == "beta" and "identity" not in plan.names:
        raise ValueError("reduce='beta' weights the plain view: add 'identity' to tta")
    batches = iter_view_probs(model, dataset, plan, views_per_call=views_per_call)
    ids, probs = [], []
    with progress_bar(
        known_length(dataset), "predict", unit="batch", disable=not verbose
    ) as bar:
        for extra, member_probs in batches:
            probs.append(reduce_views(member_probs, plan, reduce, beta))
            ids.append(extra)
            bar.update()
    if not probs:
        raise ValueError("predict: the dataset yielded no images")
    have_ids = [i is not None for i in ids]
    if any(have_ids) and not all(have_ids):
        raise ValueError("predict: some batches carry ids and others do not")
    out_ids = np.concatenate(ids) if all(have_ids) else None
    return out_ids, np.concatenate(probs).astype(np.float32)
