"""Where notebook inputs are: /kaggle/input on Kaggle, the local paths elsewhere."""

import pytest

from shopee_tpu import runtime


@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    """A Kaggle kernel's environment with inputs mounted under ``tmp_path/input``."""
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    root = tmp_path / "input"
    (root / "competitions" / "shopee-product-detection-open").mkdir(parents=True)
    (root / "competitions" / "shopee-product-detection-open" / "test.csv").write_text(
        "filename,category\n"
    )
    (root / "shopee-tpu-tfrecords" / "train").mkdir(parents=True)
    (root / "shopee-tpu-tfrecords" / "test").mkdir(parents=True)
    (root / "datasets" / "me" / "my-runs" / "run1").mkdir(parents=True)
    return root


def test_off_kaggle_the_local_path_is_used(monkeypatch, tmp_path):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(runtime, "KAGGLE_INPUT", str(tmp_path / "no-kaggle-here"))
    assert runtime.environment() in ("local", "colab")
    assert runtime.input_path(str(tmp_path), kaggle="anything") == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        runtime.input_path(str(tmp_path / "missing-folder"), kaggle="anything")


def test_on_kaggle_attached_inputs_are_found_where_kaggle_mounts_them(kaggle):
    assert runtime.environment() == "kaggle"
    found = runtime.input_path(
        "data/shopee/test.csv",
        kaggle="shopee-product-detection-open/test.csv",
        root=str(kaggle),
    )
    assert found == str(
        kaggle / "competitions" / "shopee-product-detection-open" / "test.csv"
    )
    assert runtime.input_path("runs/x", kaggle="my-runs/run1", root=str(kaggle)) == (
        str(kaggle / "datasets" / "me" / "my-runs" / "run1")
    )
    with pytest.raises(FileNotFoundError) as e:
        runtime.input_path("nowhere", kaggle="effnet-weights", root=str(kaggle))
    assert "effnet-weights" in str(e.value) and "shopee-tpu-tfrecords" in str(e.value)


def test_records_input_gives_the_demo_data_keys(kaggle, tmp_path):
    data = runtime.records_input(
        "records", kaggle="shopee-tpu-tfrecords", root=str(kaggle)
    )
    assert data == {
        "train_records": str(kaggle / "shopee-tpu-tfrecords" / "train"),
        "test_records": str(kaggle / "shopee-tpu-tfrecords" / "test"),
        "md5_dict": None,
    }
    (kaggle / "shopee-tpu-tfrecords" / "train_md5.npz").write_bytes(b"")
    data = runtime.records_input(
        "records", kaggle="shopee-tpu-tfrecords", root=str(kaggle)
    )
    assert data["md5_dict"].endswith("train_md5.npz")
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        runtime.records_input(str(kaggle / "datasets" / "me" / "my-runs"))
