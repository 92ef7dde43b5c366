"""Kaggle kernels: build (metadata checks, the embedded package), push and status with
the real kaggle client against a loopback stand-in of the kernels API."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, run_python

from shopee_tpu import cli
from shopee_tpu.kernels.build import (
    DEFAULT_TEMPLATE,
    EMBED_TAG,
    REQUIRED,
    REQUIRED_TPU,
    build_kernel,
    package_archive,
)
from shopee_tpu.kernels.client import parse_status
from shopee_tpu.kernels.metadata import (
    MACHINE_SHAPES,
    RETIRED_SHAPES,
    KernelError,
    KernelMetadataError,
    load_metadata,
    slugify,
    validate_metadata,
)

BASELINE = os.path.join(REPO, "notebooks", "shopee_tpu_baseline.ipynb")
TFRECORDS = os.path.join(REPO, "notebooks", "tfrecords.ipynb")
PACKAGE = os.path.join(REPO, "shopee_tpu")
USER, KEY = (
    "kernel-tester",
    "test-key-5f1d0c9e",
)  # a fake key the output must never show
SAVE = "/api/v1/kernels.KernelsApiService/SaveKernel"
STATUS = "/api/v1/kernels.KernelsApiService/GetKernelSessionStatus"


def _cells(path_or_nb) -> list[dict]:
    nb = path_or_nb
    if isinstance(nb, str):
        with open(nb) as f:
            nb = json.load(f)
    return nb["cells"]


def _source(cell) -> str:
    return (
        "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    )


def _embedded_archive(nb) -> bytes:
    (cell,) = [c for c in _cells(nb) if EMBED_TAG in c["metadata"].get("tags", [])]
    payload = re.search(r'b64decode\("""(.*?)"""\)', _source(cell), re.S).group(1)
    return base64.b64decode(payload)


def _build(tmp_path, *sets, notebook=BASELINE, name="kernel"):
    return build_kernel(notebook, tmp_path / name, sets=list(sets))


# ---------------------------------------------------------------------------
# Build


def test_root_template_is_the_builtin_one_and_valid_once_the_user_is_set():
    root = load_metadata(REPO)
    assert root == DEFAULT_TEMPLATE
    assert root["machine_shape"] == "TpuV5E8" and root["enable_tpu"] is True
    assert root["is_private"] is True and root["enable_internet"] is False
    with pytest.raises(KernelMetadataError) as e:
        validate_metadata(root, REPO)
    assert e.value.key == "id" and "your Kaggle username" in str(e.value)
    ok = validate_metadata({**root, "id": "me/shopee-tpu-baseline"}, REPO)
    assert os.path.isfile(os.path.join(REPO, ok["code_file"]))


@pytest.mark.parametrize(
    "title",
    [
        "shopee-tpu baseline",
        "Shopee TPU: B0 @ 224px",
        "don't stop",
        "1,000 images",
        "a__b",
    ],
)
def test_slugify_matches_the_kaggle_client(title):
    from slugify import slugify as client_slugify  # what kaggle kernels push uses

    assert slugify(title) == client_slugify(title)


def test_build_embeds_the_package_after_the_parameters_and_applies_overrides(tmp_path):
    built = _build(
        tmp_path,
        "id=me/shopee-tpu-gpu-run",
        "machine_shape=NvidiaTeslaT4",
        "dataset_sources=me/effnet-weights,me/shopee-records",
        "model_sources=google/efficientnet/keras/b0/1",
    )
    meta = json.loads((tmp_path / "kernel" / "kernel-metadata.json").read_text())
    assert meta == built["metadata"]
    # The title follows the new slug; the flags follow machine_shape.
    assert meta["title"] == "shopee tpu gpu run" and meta["code_file"] == (
        "shopee_tpu_baseline.ipynb"
    )
    assert (meta["enable_gpu"], meta["enable_tpu"]) == (True, False)
    assert meta["dataset_sources"] == ["me/effnet-weights", "me/shopee-records"]
    assert meta["enable_internet"] is False

    source, nb = (
        _cells(BASELINE),
        json.loads((tmp_path / "kernel" / meta["code_file"]).read_text()),
    )
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # The parameters cell stays first (papermill), the package comes right after it.
    assert "parameters" in code[0]["metadata"]["tags"]
    assert EMBED_TAG in code[1]["metadata"]["tags"]
    assert [
        _source(c)
        for c in nb["cells"]
        if EMBED_TAG not in c["metadata"].get("tags", [])
    ] == [_source(c) for c in source]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)

    # The archive holds the package's Python source, the modules the notebook can
    # import: what it names, what they import, and the lazy exports of each.
    with zipfile.ZipFile(io.BytesIO(_embedded_archive(nb))) as zf:
        names = sorted(zf.namelist())
        for name in names:
            with open(os.path.join(REPO, name), "rb") as f:
                assert zf.read(name) == f.read(), name
    everything = {
        os.path.relpath(os.path.join(d, f), REPO)
        for d, _, files in os.walk(PACKAGE)
        for f in files
        if f.endswith(".py") and "__pycache__" not in d
    }
    assert set(names) < everything
    needed = ("__init__", "accelerator", "training/loop", "data/read/pipeline", "plots")
    assert {f"shopee_tpu/{m}.py" for m in needed} <= set(names)
    assert {"shopee_tpu/inference/run.py", "shopee_tpu/runtime.py"} <= set(names)
    left_out = everything - set(names)
    assert {"shopee_tpu/cli/parser.py", "shopee_tpu/kernels/build.py"} <= left_out
    assert not any(n.startswith("shopee_tpu/bench/") for n in names)
    assert (
        built["package"]["sha256"] == hashlib.sha256(_embedded_archive(nb)).hexdigest()
    )

    # Building again is reproducible and replaces the embedded cell, not adds one.
    again = build_kernel(
        tmp_path / "kernel" / meta["code_file"],
        tmp_path / "again",
        sets=["id=me/abcde"],
    )
    assert again["package"]["sha256"] == built["package"]["sha256"]
    rebuilt = json.loads((tmp_path / "again" / meta["code_file"]).read_text())
    assert (
        sum(EMBED_TAG in c["metadata"].get("tags", []) for c in rebuilt["cells"]) == 1
    )


def test_machine_shape_none_turns_the_accelerator_flags_off(tmp_path):
    meta = _build(tmp_path, "id=me/shopee-tpu-records", "machine_shape=")["metadata"]
    assert (meta["machine_shape"], meta["enable_gpu"], meta["enable_tpu"]) == (
        "",
        False,
        False,
    )


# The accelerators kaggle-cli's docs/kernels.md lists "as of Feb 2026" (read at
# Kaggle/kaggle-cli a430f0b); the client sends machine_shape unchecked.
KAGGLE_CLI_ACCELERATORS = (
    "NvidiaTeslaP100 TpuV38 NvidiaTeslaT4 NvidiaTeslaT4Highmem Tpu1VmV38 "
    "NvidiaTeslaA100 NvidiaL4 TpuV5E8 NvidiaL4X1 TpuV6E8 NvidiaH100 NvidiaRtxPro6000"
).split()


@pytest.mark.parametrize("shape", KAGGLE_CLI_ACCELERATORS)
def test_every_accelerator_the_kaggle_client_lists_is_accepted_or_named_retired(
    shape,
):
    meta = dict(DEFAULT_TEMPLATE, id="me/shopee-tpu-baseline", machine_shape=shape)
    if shape in RETIRED_SHAPES:
        with pytest.raises(KernelMetadataError, match=f"{shape} is retired"):
            validate_metadata(meta, given=["machine_shape"])
        return
    out = validate_metadata(meta, given=["machine_shape"])
    kind = MACHINE_SHAPES[shape]
    assert (out["machine_shape"], out["enable_gpu"], out["enable_tpu"]) == (
        shape,
        kind == "gpu",
        kind == "tpu",
    )


def test_a_pinned_image_type_is_kept_for_a_gpu_and_refused_for_a_tpu():
    meta = dict(DEFAULT_TEMPLATE, id="me/shopee-tpu-baseline")
    gpu = dict(meta, machine_shape="NvidiaTeslaT4Highmem", enable_gpu=True)
    gpu.update(enable_tpu=False, docker_image_pinning_type="original")
    assert validate_metadata(gpu)["docker_image_pinning_type"] == "original"
    for pinning in ("original", "latest"):
        with pytest.raises(KernelMetadataError) as e:
            validate_metadata(dict(meta, docker_image_pinning_type=pinning))
        assert str(e.value) == (
            f"docker_image_pinning_type: {pinning!r} pins the session to a container "
            "image, and a TpuV5E8 session runs on a TPU VM with no image of its own: "
            "a pinned CPU/GPU image wins and the kernel runs without the TPU "
            "(kaggle-cli#1197); remove docker_image_pinning_type"
        )


BAD_SETS = [
    (["id=me/shopee-tpu-baseline/3"], "id", "version"),
    (["id=me/abc"], "id", "at least 5"),
    (["id=no-owner-here"], "id", "owner/slug"),
    (["id=me/Bad Slug!"], "id", "not a URL slug"),
    (["title=abc"], "title", "at least 5"),
    (["id=me/my-kernel", "title=Another title"], "title", "slugifies to"),
    (["language=julia"], "language", "julia"),
    (["kernel_type=app"], "kernel_type", "app"),
    (["is_private=maybe"], "is_private", "true or false"),
    (["enable_internet=yes please"], "enable_internet", "true or false"),
    (["dataset_sources=just-a-name"], "dataset_sources", "owner/dataset-slug"),
    (["kernel_sources=me/abc"], "kernel_sources", "at least 5"),
    (["model_sources=me/model/keras/b0"], "model_sources", "owner/model/framework"),
    (["model_sources=me/model/keras/b0/latest"], "model_sources", "integer"),
    (["competition_sources=[1]"], "competition_sources", "competition-slug"),
    (["machine_shape=TPUv5"], "machine_shape", "unknown accelerator"),
    (["machine_shape=TpuV38"], "machine_shape", "retired"),
    (["machine_shape=", "enable_tpu=true"], "machine_shape", "needs a TPU"),
    (["docker_image=gcr.io/kaggle-images/python"], "docker_image", "kaggle-cli#1197"),
    (["machine_shape=", "enable_gpu=true"], "machine_shape", "P100"),
    (["machine_shape=TpuV5E8", "enable_tpu=false"], "enable_tpu", "must be true"),
    (["docker_image_pinning_type=newest"], "docker_image_pinning_type", "newest"),
    (["docker_image_pinning_type=latest"], "docker_image_pinning_type", "TPU VM"),
    (["code_file=other.ipynb"], "code_file", "set by `kernel build`"),
    (["colour=blue"], "colour", "unknown metadata key"),
    (["no-equals-sign"], "--set", "key=value"),
]


@pytest.mark.parametrize("sets,key,words", BAD_SETS, ids=[b[1] for b in BAD_SETS])
def test_bad_metadata_is_refused_before_anything_is_written(
    sets, key, words, tmp_path, capsys
):
    out = tmp_path / "kernel"
    args = ["kernel", "build", BASELINE, "--out", str(out)]
    if not any(s.startswith("id=") for s in sets):
        args += ["--set", "id=me/shopee-tpu-baseline"]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"{key}:" in err or f"{key} expects" in err, err
    assert words in err, err
    assert not out.exists()


def test_bad_template_and_missing_notebook_are_named(tmp_path, capsys):
    template = tmp_path / "kernel-metadata.json"
    template.write_text(
        json.dumps(
            {k: v for k, v in DEFAULT_TEMPLATE.items() if k != "enable_internet"}
        )
    )
    out = tmp_path / "kernel"
    code = cli.main(
        ["kernel", "build", BASELINE, "--out", str(out), "--template", str(template)]
        + ["--set", "id=me/shopee-tpu-baseline"]
    )
    err = capsys.readouterr().err
    assert code == 1 and str(template) in err and "enable_internet:" in err, err
    assert not out.exists()

    missing = tmp_path / "nope" / "missing.ipynb"
    assert cli.main(["kernel", "build", str(missing), "--out", str(out)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


def test_build_refuses_to_overwrite_its_source(tmp_path, capsys):
    nb = tmp_path / "mine.ipynb"
    nb.write_text(open(BASELINE).read())
    args = ["kernel", "build", str(nb), "--out", str(tmp_path)]
    assert cli.main(args + ["--set", "id=me/shopee-tpu-baseline"]) == 1
    assert "overwrite the source notebook" in capsys.readouterr().err


def test_import_needs_no_credentials_and_never_imports_kaggle(tmp_path):
    env = _clean_env(tmp_path)
    out = run_python(
        "import sys\n"
        "import shopee_tpu, shopee_tpu.cli, shopee_tpu.kernels\n"
        "from shopee_tpu.kernels import build, client, metadata\n"
        f"build.build_kernel({BASELINE!r}, {str(tmp_path / 'k')!r},\n"
        "                    sets=['id=me/shopee-tpu-baseline'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kaggle', 'kagglesdk')))\n",
        env=env,
    )
    assert out.strip() == "[]"


def test_build_never_reads_prints_or_embeds_credentials(tmp_path):
    env = _clean_env(tmp_path)
    kaggle_json = tmp_path / "home" / ".kaggle" / "kaggle.json"
    kaggle_json.parent.mkdir(parents=True)
    kaggle_json.write_text(json.dumps({"username": USER, "key": KEY}))
    env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    out = tmp_path / "kernel"
    proc = subprocess.run(
        [sys.executable, "-m", "shopee_tpu.cli", "kernel", "build", BASELINE]
        + ["--out", str(out), "--set", "id=me/shopee-tpu-baseline"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == [
        "kernel-metadata.json",
        "shopee_tpu_baseline.ipynb",
    ]
    texts = [(out / name).read_text() for name in os.listdir(out)]
    nb = json.loads((out / "shopee_tpu_baseline.ipynb").read_text())
    with zipfile.ZipFile(io.BytesIO(_embedded_archive(nb))) as zf:
        texts += [zf.read(n).decode() for n in zf.namelist()]
    assert not any(KEY in t or USER in t for t in texts)


# ---------------------------------------------------------------------------
# The built notebook runs where shopee_tpu is not installed, and wins where it is


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


@pytest.mark.slow
def test_built_notebook_runs_its_smoke_path_without_the_package_installed(tmp_path):
    built = build_kernel(
        TFRECORDS, tmp_path / "kernel", sets=["id=me/shopee-tpu-records"]
    )
    cells = [c for c in _cells(built["notebook"]) if c["cell_type"] == "code"]
    params = _source(cells[0])
    assert "SMOKE = False" in params
    cells[0]["source"] = params.replace("SMOKE = False", "SMOKE = True")
    script = tmp_path / "kernel.py"
    script.write_text(
        # A Python with the dependencies and not shopee_tpu: -S skips site (and so
        # .pth files and the editable install); only site-packages is added back.
        "import importlib.util, sys\n"
        f"sys.path.append({_site_packages()!r})\n"
        "assert importlib.util.find_spec('shopee_tpu') is None, 'package visible'\n"
        + "\n".join(_source(c) for c in cells)
        + "\nimport shopee_tpu, tempfile\n"
        "assert shopee_tpu.__file__.startswith(tempfile.gettempdir())\n"
        "assert 'kaggle' not in sys.modules\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(tmp_path)
    env.pop("PYTHONPATH", None)
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-S", str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"embedded (sha256 {built['package']['sha256'][:12]})" in proc.stdout
    train = json.loads((work / "records" / "train" / "manifest.json").read_text())
    test = json.loads((work / "records" / "test" / "manifest.json").read_text())
    assert train["total"] > 200 and len(train["label_map"]) == 10
    assert test["total"] > 40 and not train["skipped"] and not test["skipped"]


def test_embedded_copy_wins_over_an_installed_one(tmp_path):
    # A package whose version shows which copy was imported.
    fake = tmp_path / "src" / "shopee_tpu"
    with zipfile.ZipFile(io.BytesIO(package_archive(PACKAGE)[0])) as zf:
        zf.extractall(tmp_path / "src")
    init = (fake / "__init__.py").read_text()
    (fake / "__init__.py").write_text(init.replace('"0.1.0"', '"0.1.0+embedded"'))
    nb = build_kernel(
        BASELINE,
        tmp_path / "kernel",
        sets=["id=me/shopee-tpu-baseline"],
        package_dir=fake,
    )["notebook"]
    (cell,) = [c for c in _cells(nb) if EMBED_TAG in c["metadata"].get("tags", [])]
    script = tmp_path / "kernel.py"  # too long for `python -c`
    script.write_text(
        "import shopee_tpu\n"
        "assert shopee_tpu.__version__ == '0.1.0', shopee_tpu.__version__\n"
        "import shopee_tpu.config\n" + _source(cell) + "\nimport shopee_tpu.config\n"
        "print(shopee_tpu.__version__, shopee_tpu.config.__file__)\n"
    )
    out = run_python(f"exec(open({str(script)!r}).read())", env={"PYTHONPATH": REPO})
    version, config_file = out.strip().splitlines()[-1].split()
    assert version == "0.1.0+embedded"
    assert not config_file.startswith(REPO)


# ---------------------------------------------------------------------------
# Push and status with the real kaggle client


def _clean_env(tmp_path) -> dict:
    """No Kaggle credentials anywhere: a fresh HOME, no KAGGLE_* variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAGGLE_")
        and k.lower() not in ("http_proxy", "https_proxy")
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        KAGGLE_CONFIG_DIR=str(home / ".kaggle"),
        XDG_CONFIG_HOME=str(home / ".config"),
        PYTHONPATH=REPO,
        NO_PROXY="*",
    )
    return env


class _Kaggle:
    """The kernels API on http://localhost:80: records each request, answers from
    ``replies`` by path."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies = {
            SAVE: {
                "ref": "/code/me/shopee-tpu-baseline",
                "url": "http://localhost/code/me/shopee-tpu-baseline",
                "versionNumber": 1,
                "error": "",
            },
            STATUS: {"status": "COMPLETE", "failureMessage": ""},
        }

    def handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                api.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization", ""),
                        "json": json.loads(body or b"{}"),
                    }
                )
                reply = api.replies.get(self.path)
                data = json.dumps(reply or {"code": 404, "message": "no such method"})
                self.send_response(200 if reply else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def kaggle_api(tmp_path):
    """Serves the stand-in on port 80 (tests run as root); a lock file serialises
    the tests (and parallel workers) that need the port."""
    if os.geteuid() != 0:
        pytest.fail("the kaggle client in LOCALHOST mode talks to port 80: run as root")
    api = _Kaggle()
    with open("/tmp/shopee_tpu-kaggle-port80.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = ThreadingHTTPServer(("127.0.0.1", 80), api.handler())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield api
        finally:
            server.shutdown()
            server.server_close()


def _kernel_cli(tmp_path, *args, credentials=True) -> subprocess.CompletedProcess:
    env = _clean_env(tmp_path)
    env["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
    if credentials:
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    return subprocess.run(
        [sys.executable, "-m", "shopee_tpu.cli", "kernel", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_push_sends_the_built_kernel_with_the_real_client(kaggle_api, tmp_path):
    built = _build(
        tmp_path,
        "id=me/shopee-tpu-baseline",
        "dataset_sources=me/effnet-weights",
        "kernel_sources=me/shopee-tpu-tfrecords",
        "model_sources=keras/efficientnet/keras/b0/2",
        "competition_sources=shopee-product-detection-open",
    )
    folder = built["folder"]
    before = sorted(os.listdir(folder)), open(built["notebook"]).read()
    runs = [
        _kernel_cli(tmp_path, "push", str(folder)),
        _kernel_cli(tmp_path, "push", str(folder), "--accelerator", "NvidiaTeslaT4"),
        _kernel_cli(tmp_path, "push", str(folder), "--accelerator", "none"),
        _kernel_cli(tmp_path, "push", str(folder), "--timeout", "3600"),
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "pushed me/shopee-tpu-baseline version 1" in proc.stdout
        assert KEY not in proc.stdout + proc.stderr
    assert [r["path"] for r in kaggle_api.requests] == [SAVE] * 4
    sent = [r["json"] for r in kaggle_api.requests]

    first = sent[0]
    assert first["slug"] == "me/shopee-tpu-baseline"
    assert first["newTitle"] == "shopee-tpu baseline"
    assert first["language"] == "python" and first["kernelType"] == "notebook"
    assert first["isPrivate"] is True and first.get("enableInternet", False) is False
    assert first["machineShape"] == "TpuV5E8" and first["enableTpu"] is True
    assert not first.get("enableGpu", False)
    assert first["datasetDataSources"] == ["me/effnet-weights"]
    assert first["kernelDataSources"] == ["me/shopee-tpu-tfrecords"]
    assert first["modelDataSources"] == ["keras/efficientnet/keras/b0/2"]
    assert first["competitionDataSources"] == ["shopee-product-detection-open"]
    notebook = json.loads(first["text"])
    archive = _embedded_archive(notebook)
    assert hashlib.sha256(archive).hexdigest() == built["package"]["sha256"]
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert "shopee_tpu/training/loop.py" in zf.namelist()
        assert "shopee_tpu/kernels/build.py" not in zf.namelist()
    # The client authenticated with the username and key from the environment, and
    # the key travels only in the Authorization header.
    token = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    assert all(r["auth"] == f"Basic {token}" for r in kaggle_api.requests)
    assert not any(KEY in json.dumps(r["json"]) for r in kaggle_api.requests)

    gpu, cpu, timed = sent[1], sent[2], sent[3]
    assert gpu["machineShape"] == "NvidiaTeslaT4" and gpu["enableGpu"] is True
    assert not gpu.get("enableTpu", False)
    assert not cpu.get("machineShape") and not cpu.get("enableGpu", False)
    assert not cpu.get("enableTpu", False)
    assert timed["sessionTimeoutSeconds"] == 3600
    # --accelerator pushes a staged copy: the built folder is untouched.
    assert (sorted(os.listdir(folder)), open(built["notebook"]).read()) == before


def test_root_template_is_accepted_by_kaggle_kernels_push_itself(kaggle_api, tmp_path):
    env = _clean_env(tmp_path)
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    proc = subprocess.run(
        [sys.executable, "-m", "kaggle", "kernels", "push", "-p", REPO],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "successfully pushed" in proc.stdout
    assert "does not resolve" not in proc.stdout  # the title/slug warning
    (sent,) = [r["json"] for r in kaggle_api.requests]
    assert sent["slug"] == DEFAULT_TEMPLATE["id"]
    assert sent["machineShape"] == "TpuV5E8" and sent["enableTpu"] is True
    assert sent.get("enableInternet", False) is False and sent["isPrivate"] is True


def test_push_reports_what_kaggle_refused(kaggle_api, tmp_path):
    folder = _build(tmp_path, "id=me/shopee-tpu-baseline")["folder"]
    kaggle_api.replies[SAVE] = {
        "error": "Maximum batch TPU session count of 1 reached",
        "versionNumber": None,
    }
    proc = _kernel_cli(tmp_path, "push", str(folder))
    assert proc.returncode == 1
    assert "Maximum batch TPU session count of 1 reached" in proc.stderr


def test_push_of_a_notebook_without_the_package_is_refused_before_sending(
    kaggle_api, tmp_path
):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "shopee_tpu_baseline.ipynb").write_text(open(BASELINE).read())
    meta = {**DEFAULT_TEMPLATE, "id": "me/shopee-tpu-baseline"}
    meta["code_file"] = "shopee_tpu_baseline.ipynb"
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    proc = _kernel_cli(tmp_path, "push", str(folder))
    assert proc.returncode == 1 and "code_file:" in proc.stderr
    assert "kernel build" in proc.stderr and not kaggle_api.requests


def test_push_without_credentials_says_how_to_set_them(tmp_path):
    folder = _build(tmp_path, "id=me/shopee-tpu-baseline")["folder"]
    env_marker = "username-from-the-environment"
    env = _clean_env(tmp_path)
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", KAGGLE_USERNAME=env_marker)
    proc = subprocess.run(
        [sys.executable, "-m", "shopee_tpu.cli", "kernel", "push", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "no Kaggle credentials" in proc.stderr
    assert "KAGGLE_KEY" in proc.stderr and "kaggle.json" in proc.stderr
    assert env_marker not in proc.stdout + proc.stderr


def test_push_and_status_without_the_client_name_the_extra(tmp_path):
    folder = _build(tmp_path, "id=me/shopee-tpu-baseline")["folder"]
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # An import hook that hides the kaggle package, as if it were not installed.
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NoKaggle(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'kaggle':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoKaggle())\n"
    )
    env = _clean_env(tmp_path)
    env["PYTHONPATH"] = f"{blocker}{os.pathsep}{REPO}"
    for args in (["push", str(folder)], ["status", "me/shopee-tpu-baseline"]):
        proc = subprocess.run(
            [sys.executable, "-m", "shopee_tpu.cli", "kernel", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr
        assert "pip install 'shopee_tpu[kaggle]'" in proc.stderr


@pytest.mark.parametrize(
    "value,status",
    [
        ("complete", "complete"),
        ("KernelWorkerStatus.COMPLETE", "complete"),
        ('me/shopee-tpu-baseline has status "running"', "running"),
        ('me/x has status "KernelWorkerStatus.ERROR"', "error"),
        ("CANCEL_ACKNOWLEDGED", "cancel_acknowledged"),
        ({"status": "queued", "failureMessage": None}, "queued"),
    ],
)
def test_parse_status_reads_old_and_new_clients(value, status):
    assert parse_status(value) == status


def test_parse_status_reads_the_enum_and_refuses_nonsense():
    from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus

    assert parse_status(KernelWorkerStatus.NEW_SCRIPT) == "new_script"
    with pytest.raises(ValueError, match="unknown kernel status"):
        parse_status("finished-ish")


def test_status_with_the_real_client(kaggle_api, tmp_path):
    proc = _kernel_cli(tmp_path, "status", "me/shopee-tpu-baseline")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "me/shopee-tpu-baseline: complete"
    assert kaggle_api.requests[-1]["path"] == STATUS
    assert kaggle_api.requests[-1]["json"] == {
        "userName": "me",
        "kernelSlug": "shopee-tpu-baseline",
    }

    kaggle_api.replies[STATUS] = {"status": "ERROR", "failureMessage": "OOM on TPU"}
    proc = _kernel_cli(tmp_path, "status", "me/shopee-tpu-baseline")
    assert proc.returncode == 1
    assert "me/shopee-tpu-baseline: error" in proc.stdout
    assert "OOM on TPU" in proc.stdout

    proc = _kernel_cli(tmp_path, "status", "not-a-slug")
    assert proc.returncode == 1 and "owner/slug" in proc.stderr


def test_a_tpu_kernel_drops_the_editors_metadata_and_checks_the_image(tmp_path):
    # A notebook saved by Kaggle's editor: its metadata.kaggle block would put the
    # kernel on its own image, the CPU one (kaggle-cli#1197).
    nb = json.loads(open(BASELINE).read())
    nb["metadata"]["kaggle"] = {
        "accelerator": "none",
        "dockerImageVersionId": 31040,
        "isInternetEnabled": False,
    }
    source = tmp_path / "notebook.ipynb"
    source.write_text(json.dumps(nb))
    built = build_kernel(source, tmp_path / "kernel", sets=["id=me/shopee-tpu-tpu"])
    assert built["metadata"]["machine_shape"] == "TpuV5E8"
    out = json.loads((tmp_path / "kernel" / "notebook.ipynb").read_text())
    assert "kaggle" not in out["metadata"]
    size = (tmp_path / "kernel" / "notebook.ipynb").stat().st_size
    assert built["package"]["notebook_bytes"] == size < 1_000_000

    # The bootstrap cell, run by a Python whose keras is older than the package
    # needs: one line naming the package and both versions, before any import.
    (cell,) = [c for c in out["cells"] if EMBED_TAG in c["metadata"].get("tags", [])]
    old = tmp_path / "old" / "keras-3.0.1.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: keras\nVersion: 3.0.1\n"
    )
    script = tmp_path / "bootstrap.py"
    script.write_text(_source(cell))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "old"))
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "shopee_tpu needs keras>=3.12; this image has keras 3.0.1: pick a newer "
        "Kaggle image, or pip install 'keras>=3.12' with the internet on"
    ]
    # A TPU kernel also needs JAX; the image's versions pass here.
    assert "'jax': '0.5.1'" in _source(cell)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_kernels_version_check_uses_the_floors_of_setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))

    def floor(section, key, name):
        lines = cfg[section][key].splitlines()
        found = [
            re.match(rf"{re.escape(name)}>=([\d.]+)\s*(;.*)?$", ln.strip())
            for ln in lines
        ]
        return next(m[1] for m in found if m)

    extras = "options.extras_require"
    assert REQUIRED == {
        "keras": floor("options", "install_requires", "keras"),
        "tensorflow": floor(extras, "cpu", "tensorflow-cpu"),
    }
    assert REQUIRED_TPU == {"jax": floor(extras, "jax", "jax")}


def test_a_kernel_source_over_one_megabyte_is_refused_with_its_size(tmp_path):
    nb = json.loads(open(BASELINE).read())
    nb["cells"].append(
        {"cell_type": "markdown", "metadata": {}, "source": "x" * 1_100_000}
    )
    source = tmp_path / "big.ipynb"
    source.write_text(json.dumps(nb))
    with pytest.raises(KernelError, match=r"big.ipynb: the built kernel is 1\.\d\d MB"):
        build_kernel(source, tmp_path / "kernel", sets=["id=me/shopee-tpu-big"])
    assert not (tmp_path / "kernel").exists()
