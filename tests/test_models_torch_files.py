"""The torch-free reader against files real PyTorch wrote (tests/data/torch, made
by its make_files.py with torch 2.13.0): both serializations, views of storages,
every dtype a state dict holds, read exactly as torch reads them back."""

import os

import numpy as np
import pytest
from conftest import REPO

from shopee_tpu.models.weights.torch_files import is_torch_file, read_state_dict

DATA = os.path.join(REPO, "tests", "data", "torch")
FILES = ("tiny_zip.pth", "tiny_legacy.pth", "views_zip.pth", "views_legacy.pth")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(DATA, "expected.npz")) as z:
        return {name: z[name] for name in z.files}


@pytest.mark.parametrize("name", FILES)
def test_files_written_by_torch_read_exactly(name, expected):
    path = os.path.join(DATA, name)
    assert is_torch_file(path)
    state = read_state_dict(path)
    want = {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(name)}
    assert sorted(state) == sorted(want)
    for key, array in state.items():
        if want[key].dtype == np.uint16:  # bfloat16's bits: numpy has no bfloat16
            # The reader widens it to float32, exactly (the bits become its high half).
            want[key] = (want[key].astype(np.uint32) << 16).view(np.float32)
        assert array.dtype == want[key].dtype, key
        assert array.shape == want[key].shape, key
        np.testing.assert_array_equal(array, want[key], err_msg=key)


def test_both_serializations_hold_the_same_tensors():
    for kind in ("tiny", "views"):
        zipped = read_state_dict(os.path.join(DATA, f"{kind}_zip.pth"))
        legacy = read_state_dict(os.path.join(DATA, f"{kind}_legacy.pth"))
        assert sorted(zipped) == sorted(legacy)
        for key in zipped:
            assert zipped[key].dtype == legacy[key].dtype, key
            np.testing.assert_array_equal(zipped[key], legacy[key], err_msg=key)
    tiny = read_state_dict(os.path.join(DATA, "tiny_zip.pth"))
    # What a module's state dict holds: float32 weights and the int64 step count.
    assert (
        tiny["0.weight"].shape == (4, 3, 3, 3) and tiny["0.weight"].dtype == "float32"
    )
    assert tiny["1.num_batches_tracked"].dtype == np.int64
    assert int(tiny["1.num_batches_tracked"]) == 1
