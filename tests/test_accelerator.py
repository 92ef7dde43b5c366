"""connect() in this process on the TensorFlow backend: a 2-core CPU, no accelerator.

Set-ups that must be chosen before TensorFlow starts (logical devices, TF_CONFIG,
the JAX backend) are in test_accelerator_distributed.py, in fresh interpreters.
"""

from __future__ import annotations

import numpy as np
import pytest

from shopee_tpu.accelerator import DEVICE_ENV, AcceleratorNotFound, connect


@pytest.fixture(autouse=True)
def plain_cpu_env(monkeypatch):
    """No forced device, no cluster and no TPU-VM markers from the outer shell."""
    for name in (
        DEVICE_ENV,
        "TF_CONFIG",
        "TPU_NAME",
        "ISTPUVM",
        "TPU_ACCELERATOR_TYPE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def restore_policy():
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")


def test_auto_mode_falls_back_to_cpu_and_says_so(capsys):
    acc = connect(backend="tensorflow")

    assert (acc.kind, acc.replicas, acc.backend) == ("cpu", 1, "tensorflow")
    assert (acc.num_workers, acc.worker_index) == (1, 0)
    assert acc.batch_size(16) == 16
    assert acc.devices == ["/device:CPU:0"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [acc.summary]
    assert "CPU x1" in acc.summary and "default strategy" in acc.summary
    assert "fell back to CPU" in acc.summary


def test_scope_trains_a_model_under_the_returned_strategy():
    import keras
    import tensorflow as tf

    acc = connect(backend="tensorflow", verbose=False)
    with acc.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        assert tf.distribute.get_strategy() is acc.strategy
    before = model.get_weights()[0].copy()
    model.fit(np.ones((8, 3), "float32"), np.zeros((8, 2), "float32"), verbose=0)
    assert not np.allclose(before, model.get_weights()[0])


def test_forced_tpu_without_a_tpu_is_a_clear_error():
    with pytest.raises(AcceleratorNotFound) as err:
        connect("tpu", backend="tensorflow", verbose=False)
    message = str(err.value)
    assert "no TPU found" in message
    assert "TPUClusterResolver(tpu='local')" in message  # what it looked for
    assert "KERAS_BACKEND" in message  # and the way out on Kaggle's image
    assert "ConfigureDistributedTPU" not in message  # not a raw kernel dump


def test_auto_mode_with_a_tpu_hint_but_no_tpu_falls_back_quietly(monkeypatch):
    monkeypatch.setenv("TPU_NAME", "local")  # TPU_NAME makes auto mode try a TPU

    acc = connect(backend="tensorflow", verbose=False)

    assert (acc.kind, acc.replicas) == ("cpu", 1)
    assert "TensorFlow cannot use the TPU here" in acc.summary
    assert "fell back to CPU" in acc.summary


def test_device_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(AcceleratorNotFound, match="device='tpu'"):
        connect(backend="tensorflow", verbose=False)

    monkeypatch.setenv(DEVICE_ENV, "CPU")
    acc = connect(backend="tensorflow", verbose=False)
    assert acc.kind == "cpu" and acc.note == ""  # forced CPU: not a fallback

    monkeypatch.setenv(DEVICE_ENV, "tpuv5")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        connect(backend="tensorflow", verbose=False)


def test_forced_gpu_without_a_gpu_is_a_clear_error():
    with pytest.raises(AcceleratorNotFound, match="lists no GPU"):
        connect("gpu", backend="tensorflow", verbose=False)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="strategy"):
        connect(strategy="horovod", verbose=False)
    with pytest.raises(ValueError, match="TPUStrategy"):
        connect("tpu", strategy="mirrored", backend="tensorflow", verbose=False)
    # Keras is already running on TensorFlow here: switching needs a restart.
    with pytest.raises(ValueError, match="restart the kernel"):
        connect(backend="jax", verbose=False)


def test_mixed_precision_stays_float32_on_cpu(restore_policy):
    import keras

    acc = connect(mixed_precision=True, backend="tensorflow", verbose=False)

    assert acc.precision == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert "mixed precision stays off on CPU" in acc.summary


def test_named_policy_is_applied_on_any_device(restore_policy):
    import keras

    acc = connect(mixed_precision="mixed_bfloat16", backend="tensorflow", verbose=False)

    assert acc.precision == "mixed_bfloat16"
    assert "precision=mixed_bfloat16" in acc.summary
    layer = keras.layers.Dense(2)
    assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
    # mixed_precision=False puts float32 back.
    connect(backend="tensorflow", verbose=False)
    assert keras.mixed_precision.global_policy().name == "float32"
