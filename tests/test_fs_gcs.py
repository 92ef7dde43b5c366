"""``shopee_tpu.fs`` on ``gs://`` paths, against a real GCS emulator on loopback
(tests/gcs_server.py): every remote function, atomic writes, errors as the built-in
ones, and no TensorFlow import on the way."""

import os

import pytest
from conftest import run_python
from gcs_server import GcsEmulator

from shopee_tpu import fs


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    yield server
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved
    server.close()


def test_write_read_and_replace_leave_only_the_objects_written(gcs):
    fs.write_text("gs://bucket/rw/a.json", '{"x": 1}')
    fs.write_json("gs://bucket/rw/b.json", {"y": [1, 2]})
    fs.write_bytes("gs://bucket/rw/c.bin", b"\x00\xff" * 1000)
    fs.write_json("gs://bucket/rw/b.json", {"y": [3]})  # replaced whole
    assert fs.read_json("gs://bucket/rw/a.json") == {"x": 1}
    assert fs.read_json("gs://bucket/rw/b.json") == {"y": [3]}
    assert fs.read_bytes("gs://bucket/rw/c.bin") == b"\x00\xff" * 1000
    # No temporary object is ever made in the bucket.
    rw = [n for n in gcs.objects() if n.startswith("rw/")]
    assert rw == ["rw/a.json", "rw/b.json", "rw/c.bin"]


def test_an_interrupted_atomic_write_keeps_the_old_object(gcs):
    path = "gs://bucket/atomic/weights.weights.h5"
    fs.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with fs.atomic_path(path) as tmp:
            # A local file, named like the target (Keras checks the suffix).
            assert not fs.is_remote(tmp) and tmp.endswith("/weights.weights.h5")
            with open(tmp, "wb") as f:
                f.write(b"half of the ne")
            raise RuntimeError("interrupted")
    assert fs.read_bytes(path) == b"old"
    with fs.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    assert fs.read_bytes(path) == b"new"
    assert [n for n in gcs.objects() if n.startswith("atomic/")] == [
        "atomic/weights.weights.h5"
    ]


def test_exists_isdir_and_listdir_treat_prefixes_as_folders(gcs):
    for name in ("run/state.json", "run/fold-0/config.json", "run/fold-1/a.h5"):
        fs.write_text(f"gs://bucket/{name}", "{}")
    assert fs.exists("gs://bucket/run/state.json")
    assert fs.exists("gs://bucket/run") and fs.exists("gs://bucket/run/")
    assert fs.exists("gs://bucket/run/fold-0")
    assert not fs.exists("gs://bucket/run/missing.json")
    assert not fs.exists("gs://bucket/ru")  # a prefix of a name is no folder
    assert fs.exists("gs://bucket") and not fs.exists("gs://no-such-bucket")
    assert fs.isdir("gs://bucket/run") and fs.isdir("gs://bucket/run/fold-1")
    assert not fs.isdir("gs://bucket/run/state.json")
    assert fs.listdir("gs://bucket/run") == ["fold-0", "fold-1", "state.json"]
    assert fs.listdir("gs://bucket/run/fold-0/") == ["config.json"]
    # GCS has no empty folders: one that holds nothing lists as empty.
    fs.makedirs("gs://bucket/empty")
    assert fs.listdir("gs://bucket/empty") == []


def test_glob_matches_within_a_segment_and_matches_folders(gcs):
    names = ["recs/train-0-10.tfrec", "recs/train-1-12.tfrec", "recs/manifest.json"]
    names += ["recs/sub/train-2-5.tfrec", "runs/a/x.json", "runs/b/x.json"]
    for name in names:
        fs.write_text(f"gs://bucket/glob/{name}", "")
    root = "gs://bucket/glob"
    assert sorted(fs.glob(f"{root}/recs/*.tfrec")) == [
        f"{root}/recs/train-0-10.tfrec",
        f"{root}/recs/train-1-12.tfrec",
    ]
    assert fs.glob(f"{root}/recs/train-[1]-??.tfrec") == [
        f"{root}/recs/train-1-12.tfrec"
    ]
    assert sorted(fs.glob(f"{root}/runs/*")) == [f"{root}/runs/a", f"{root}/runs/b"]
    assert sorted(fs.glob(f"{root}/*/*/x.json")) == [
        f"{root}/runs/a/x.json",
        f"{root}/runs/b/x.json",
    ]
    assert fs.glob(f"{root}/recs/*.missing") == []


def test_remove_rename_put_and_local_copy(gcs, tmp_path):
    local = tmp_path / "w.weights.h5"
    local.write_bytes(b"weights" * 100)
    fs.put(local, "gs://bucket/mv/.pending-1-last.weights.h5")
    fs.write_bytes("gs://bucket/mv/last.weights.h5", b"older")
    fs.rename(
        "gs://bucket/mv/.pending-1-last.weights.h5", "gs://bucket/mv/last.weights.h5"
    )
    assert fs.listdir("gs://bucket/mv") == ["last.weights.h5"]
    with fs.local_copy("gs://bucket/mv/last.weights.h5") as copy:
        assert not fs.is_remote(copy) and copy.endswith("last.weights.h5")
        with open(copy, "rb") as f:
            assert f.read() == b"weights" * 100
    fs.remove("gs://bucket/mv/last.weights.h5")
    assert not fs.exists("gs://bucket/mv/last.weights.h5")
    with pytest.raises(FileNotFoundError, match="gs://bucket/mv/last.weights.h5"):
        fs.remove("gs://bucket/mv/last.weights.h5")
    with pytest.raises(FileNotFoundError, match="gs://bucket/mv/gone"):
        fs.rename("gs://bucket/mv/gone", "gs://bucket/mv/there")


def test_errors_name_the_path(gcs):
    with pytest.raises(FileNotFoundError, match=r"gs://bucket/none\.json: missing; x"):
        fs.read_json("gs://bucket/none.json", what="x")
    fs.write_text("gs://bucket/bad.json", "{not json")
    with pytest.raises(ValueError, match=r"gs://bucket/bad\.json: not valid JSON"):
        fs.read_json("gs://bucket/bad.json")
    with pytest.raises(ValueError, match="only local paths and gs://"):
        fs.read_text("s3://bucket/x")


def test_gs_paths_never_import_tensorflow_or_keras(gcs):
    # On a TPU VM a run folder in a bucket is opened before connect(); importing
    # TensorFlow there would start Keras on the TensorFlow backend.
    # Nor are record files listed and counted (from their manifest) that way.
    fs.write_bytes("gs://bucket/notf/recs/train-00-7.tfrec", b"")
    fs.write_json("gs://bucket/notf/recs/manifest.json", {"shards": {}})
    out = run_python(
        "import sys\n"
        "from shopee_tpu import fs\n"
        "from shopee_tpu.data.read.files import count_records, list_files\n"
        "from shopee_tpu.run_folder import RunFolder\n"
        "fs.write_json('gs://bucket/notf/run/config.json', {'a': 1})\n"
        "run = RunFolder('gs://bucket/notf/run')\n"
        "print(fs.read_json(run.file('config.json')), fs.listdir(run.path), run.epoch)\n"
        "print(list_files('gs://bucket/notf/recs'), count_records('gs://bucket/notf/recs'))\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))\n",
        env={"STORAGE_EMULATOR_HOST": gcs.url},
    )
    assert out.splitlines() == [
        "{'a': 1} ['config.json'] 0",
        "['gs://bucket/notf/recs/train-00-7.tfrec'] 7",
        "[]",
    ]
