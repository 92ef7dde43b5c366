"""``shopee-tpu kernel build``: a push-ready folder whose notebook carries the package.

Most image competitions run submissions with the internet off, so a kernel cannot
``pip install`` anything. The build puts the package itself into the notebook: one
generated cell holds a zip of ``shopee_tpu``'s source (base64), unpacks it into the
temp folder and puts it first on ``sys.path``. The kernel then imports exactly the
code that was built and tested, with no install and no dataset to attach, even when
the image has another ``shopee_tpu`` installed.

Only the modules the notebook can reach go in (its ``shopee_tpu`` imports and
theirs, lazy exports included: no benchmarks, no command line), and the cell first
checks that the image's Keras, TensorFlow and (on a TPU) JAX are recent enough,
stopping with one line that names the package otherwise: Kaggle's images move on
their own schedule.

The folder holds the notebook and ``kernel-metadata.json`` made from a template
(the repository's ``kernel-metadata.json``, or the built-in copy of it) with the
``--set`` overrides applied and checked before anything is written. The notebook's
own ``metadata.kaggle`` block (``accelerator``, ``dockerImageVersionId``) is
dropped: it would override the metadata file and put a TPU kernel on the CPU image
(kaggle-cli#1197). Kaggle refuses kernel sources over 1 MB, so a larger build is an
error. Credentials are never read: pushing is a separate step
(``shopee_tpu.kernels.client``).
"""

from __future__ import annotations

import ast
import base64
import copy
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterable
from typing import Any

import shopee_tpu
from shopee_tpu import fs
from shopee_tpu.kernels.metadata import (
    MACHINE_SHAPES,
    METADATA_FILE,
    KernelError,
    apply_overrides,
    load_metadata,
    slugify,
    validate_metadata,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "EMBED_TAG",
    "build_kernel",
    "embed_package",
    "package_archive",
]

EMBED_TAG = "shopee-tpu-embedded"
MAX_SOURCE_BYTES = 1 << 20  # Kaggle refuses larger kernel sources
# The oldest versions the package runs on (setup.cfg's floors), by what the kernel
# imports: TensorFlow feeds every accelerator (tf.data), JAX drives the TPU.
REQUIRED = {"keras": "3.12", "tensorflow": "2.16"}
REQUIRED_TPU = {"jax": "0.5.1"}

# The repository's kernel-metadata.json, for users who installed the package and have
# only a notebook (a test keeps the two identical).
DEFAULT_TEMPLATE: dict[str, Any] = {
    "id": "your-kaggle-username/shopee-tpu-baseline",
    "title": "shopee-tpu baseline",
    "code_file": "notebooks/shopee_tpu_baseline.ipynb",
    "language": "python",
    "kernel_type": "notebook",
    "is_private": True,
    "enable_internet": False,
    "enable_gpu": False,
    "enable_tpu": True,
    "machine_shape": "TpuV5E8",
    "dataset_sources": [],
    "competition_sources": ["shopee-product-detection-open"],
    "kernel_sources": [],
    "model_sources": [],
    "keywords": [],
}

# The embedded package goes before the first cell that imports shopee_tpu or looks
# it up: the notebooks' install cell must find it there and install nothing.
_IMPORTS_PACKAGE = re.compile(
    r"^\s*(import|from)\s+shopee_tpu\b|find_spec\(\s*['\"]shopee_tpu['\"]", re.MULTILINE
)

_EMBED_CELL = '''\
# shopee_tpu {version}, embedded by `shopee-tpu kernel build` ({files} files, sha256 {short}).
# This cell makes `import shopee_tpu` load the copy below: no pip install, no internet, no
# dataset to attach, and an installed shopee_tpu cannot shadow the code that was built.
import base64, hashlib, importlib, importlib.metadata, io, os, shutil, sys, tempfile, zipfile


def _st_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _st_tuple(version):
    return tuple(int(p) for p in (version.split("+")[0].split(".") + ["0", "0"])[:3]
                 if p.isdigit()) or (0,)


# The image's packages, read from their metadata (importing them would fix Keras's
# backend before shopee_tpu.connect() chooses it).
for _st_name, _st_floor in {required!r}.items():
    _st_dists = [_st_name] + [_st_name + s for s in ("-cpu", "-tpu", "-gpu")]
    _st_found = next((v for v in (_st_version(d) for d in _st_dists) if v), None)
    if _st_found is None or _st_tuple(_st_found) < _st_tuple(_st_floor):
        raise SystemExit(
            f"shopee_tpu needs {{_st_name}}>={{_st_floor}}; this image has "
            f"{{_st_name}} {{_st_found or 'not installed'}}: pick a newer Kaggle image, "
            f"or pip install '{{_st_name}}>={{_st_floor}}' with the internet on"
        )

_st_archive = base64.b64decode("""
{payload}""")
assert hashlib.sha256(_st_archive).hexdigest() == "{digest}", "embedded package damaged"
_st_dir = os.path.join(tempfile.gettempdir(), "shopee_tpu-{short}")
if not os.path.isfile(os.path.join(_st_dir, "shopee_tpu", "__init__.py")):
    _st_tmp = tempfile.mkdtemp(prefix=".shopee_tpu-", dir=tempfile.gettempdir())
    zipfile.ZipFile(io.BytesIO(_st_archive)).extractall(_st_tmp)
    try:
        os.replace(_st_tmp, _st_dir)  # atomic: a half-written copy is never used
    except OSError:  # another process unpacked it first
        shutil.rmtree(_st_tmp, ignore_errors=True)
if sys.path[:1] != [_st_dir]:
    sys.path.insert(0, _st_dir)
for _st_module in [m for m in sys.modules if m.split(".")[0] == "shopee_tpu"]:
    del sys.modules[_st_module]
importlib.invalidate_caches()
import shopee_tpu

assert shopee_tpu.__file__.startswith(_st_dir), shopee_tpu.__file__
print(f"shopee_tpu {{shopee_tpu.__version__}} embedded (sha256 {short}) in {{_st_dir}}")
del _st_archive, _st_version, _st_tuple
'''


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(shopee_tpu.__file__))


def package_archive(
    package_dir: str | os.PathLike | None = None, modules: Iterable[str] | None = None
) -> tuple[bytes, str]:
    """A reproducible zip of the package's Python source.

    ``*.py`` files (and ``py.typed``) go in, under ``shopee_tpu/``, sorted and with
    fixed timestamps, so the same source always gives the same bytes and hash.

    Args:
        package_dir: The package folder (default: this ``shopee_tpu``).
        modules: The files to include, relative to the package (see
            ``reachable_modules``); default: all.

    Returns:
        ``(zip_bytes, sha256_hex)``.
    """
    root = os.fspath(package_dir or _package_dir())
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in files:
            if name.endswith(".py") or name == "py.typed":
                names.append(os.path.relpath(os.path.join(folder, name), root))
    if "__init__.py" not in names:
        raise KernelError(f"{root}: not a package (no __init__.py)")
    if modules is not None:
        wanted = {m.replace(os.sep, "/") for m in modules}
        names = [n for n in names if n.replace(os.sep, "/") in wanted]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for rel in sorted(names):
            info = zipfile.ZipInfo(
                "shopee_tpu/" + rel.replace(os.sep, "/"), (1980, 1, 1, 0, 0, 0)
            )
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(os.path.join(root, rel), "rb") as f:
                zf.writestr(info, f.read())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


_MODULE_NAME = re.compile(r"^shopee_tpu(\.[A-Za-z_]\w*)*$")


def reachable_modules(
    sources: Iterable[str], package_dir: str | os.PathLike | None = None
) -> set[str]:
    """The files (relative to the package) of the ``shopee_tpu`` modules that code
    importing as ``sources`` can load: its imports, theirs (in any scope), the
    modules named by lazy exports (string constants such as
    ``"shopee_tpu.accelerator"``), and each one's package."""
    root = os.fspath(package_dir or _package_dir())

    def exists(module: str) -> str | None:
        rel = module.split(".")[1:]
        for path in (
            os.path.join(root, *rel) + ".py",
            os.path.join(root, *rel, "__init__.py"),
        ):
            if os.path.isfile(path):
                return path
        return None

    def named(tree: ast.AST) -> set[str]:
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                # `from shopee_tpu.data.read import pipeline` names a module too
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
        return {m for m in found if _MODULE_NAME.match(m) and exists(m)}

    todo = {"shopee_tpu"}
    for source in sources:
        todo |= named(ast.parse(source))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # its packages
        with open(exists(module), encoding="utf-8") as f:
            todo |= named(ast.parse(f.read()))
    return {os.path.relpath(exists(m), root) for m in seen}


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def embed_package(
    notebook: dict,
    package_dir: str | os.PathLike | None = None,
    *,
    accelerator: str | None = None,
) -> tuple[dict, dict]:
    """Returns a copy of ``notebook`` (nbformat 4 JSON) that carries the package.

    The generated cell goes right before the first code cell that imports
    ``shopee_tpu`` (after the ``parameters`` cell in our notebooks), or replaces the
    one a previous build put there. Outputs and the notebook's ``metadata.kaggle``
    block are dropped.

    Args:
        notebook: The notebook's JSON.
        package_dir: The package source (default: this ``shopee_tpu``).
        accelerator: ``"tpu"`` also requires JAX in the image.

    Returns:
        ``(notebook, info)`` with the package ``version``, ``sha256``, ``files`` and
        archive ``bytes``.
    """
    code = [
        _source(c) for c in notebook.get("cells", []) if c.get("cell_type") == "code"
    ]
    code = [c for c in code if EMBED_TAG not in c]  # not a previous build's cell
    modules = reachable_modules(code, package_dir)
    archive, digest = package_archive(package_dir, modules)
    required = {**REQUIRED, **(REQUIRED_TPU if accelerator == "tpu" else {})}
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        files = len(zf.namelist())
        init = zf.read("shopee_tpu/__init__.py").decode()
    version = re.search(r'__version__\s*=\s*"([^"]+)"', init)
    version = version.group(1) if version else "unknown"
    source = _EMBED_CELL.format(
        version=version,
        files=files,
        short=digest[:12],
        digest=digest,
        payload=base64.encodebytes(archive).decode("ascii").rstrip("\n"),
        required=required,
    )
    nb = copy.deepcopy(notebook)
    # Kaggle's editor writes it; pushed, it overrides kernel-metadata.json
    # (kaggle-cli#1197: a TPU kernel on the CPU image).
    nb.get("metadata", {}).pop("kaggle", None)
    cells = [c for c in nb.get("cells", []) if EMBED_TAG not in _tags(c)]
    for cell in cells:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    cell = {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": [EMBED_TAG], "jupyter": {"source_hidden": True}},
        "outputs": [],
        "source": source,
    }
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
        cell["id"] = EMBED_TAG
    at = next(
        (
            i
            for i, c in enumerate(cells)
            if c.get("cell_type") == "code" and _IMPORTS_PACKAGE.search(_source(c))
        ),
        next((i for i, c in enumerate(cells) if c.get("cell_type") == "code"), 0),
    )
    nb["cells"] = cells[:at] + [cell] + cells[at:]
    info = {"version": version, "sha256": digest, "files": files, "bytes": len(archive)}
    return nb, info


def _tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _find_template(notebook: str) -> str | None:
    """``kernel-metadata.json`` beside the notebook or one folder up (the repo root
    for ``notebooks/x.ipynb``)."""
    here = os.path.dirname(os.path.abspath(notebook))
    for folder in (here, os.path.dirname(here)):
        path = os.path.join(folder, METADATA_FILE)
        if os.path.isfile(path):
            return path
    return None


def build_kernel(
    notebook: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sets: Iterable[str] = (),
    template: str | os.PathLike | None = None,
    package_dir: str | os.PathLike | None = None,
) -> dict:
    """Writes a push-ready kernel folder: the notebook with the package embedded,
    and its ``kernel-metadata.json``.

    Args:
        notebook: The ``.ipynb`` to build.
        out: Output folder (created; the two files are replaced atomically).
        sets: ``key=value`` metadata overrides, e.g. ``id=me/shopee-tpu-baseline``,
            ``machine_shape=TpuV5E8``, ``dataset_sources=me/weights``. When ``id``
            is set and ``title`` is not, the title is derived from the new slug.
            The GPU/TPU flags follow ``machine_shape`` unless set explicitly.
        template: Metadata template; default: ``kernel-metadata.json`` next to the
            notebook or one folder up, else ``DEFAULT_TEMPLATE``.
        package_dir: The package source to embed (default: this ``shopee_tpu``).

    Returns:
        ``{"folder", "notebook", "metadata", "package", "template"}``.

    Raises:
        FileNotFoundError: The notebook or template does not exist.
        KernelMetadataError: A metadata problem, naming the key; nothing is written.
    """
    notebook, out = os.fspath(notebook), os.fspath(out)
    if not os.path.isfile(notebook):
        raise FileNotFoundError(f"{notebook}: notebook not found")
    meta, template = _kernel_metadata(notebook, sets, template)
    target = os.path.join(out, meta["code_file"])
    if os.path.abspath(target) == os.path.abspath(notebook):
        raise KernelError(f"--out {out}: would overwrite the source notebook")
    text, info = _built_notebook(notebook, package_dir, meta["machine_shape"])

    os.makedirs(out, exist_ok=True)
    written = {
        target: text,
        os.path.join(out, METADATA_FILE): json.dumps(meta, indent=2) + "\n",
    }
    for path, text in written.items():
        fs.write_text(path, text)
        os.chmod(path, 0o644)  # a normal file, not the temp file's 0600
    return {
        "folder": out,
        "notebook": target,
        "metadata": meta,
        "package": info,
        "template": template or "built-in",
    }


def _kernel_metadata(notebook: str, sets, template) -> tuple[dict, str | None]:
    """The checked metadata for ``notebook``, and the template it came from."""
    if template is not None and not os.path.isfile(os.fspath(template)):
        raise FileNotFoundError(f"{template}: metadata template not found")
    template = os.fspath(template) if template else _find_template(notebook)
    base = load_metadata(template) if template else dict(DEFAULT_TEMPLATE)
    meta, given = apply_overrides(base, sets)
    if "code_file" in given:
        raise KernelError(
            "code_file: set by `kernel build` to the notebook it writes; "
            "rename the notebook instead"
        )
    meta["code_file"] = os.path.basename(notebook)
    if "id" in given and "title" not in given and isinstance(meta.get("id"), str):
        slug = meta["id"].partition("/")[2]
        if slugify(str(meta.get("title", ""))) != slug.lower():
            meta["title"] = slug.replace("-", " ")
    meta = validate_metadata(
        meta, None, given=given, where=template or "built-in template"
    )
    return meta, template


def _built_notebook(notebook: str, package_dir, machine_shape: str):
    """``(text, info)``: the notebook's JSON with the package embedded, within
    Kaggle's size limit, and :func:`embed_package`'s info plus its size."""
    with open(notebook, encoding="utf-8") as f:
        try:
            nb = json.load(f)
        except json.JSONDecodeError as e:
            raise KernelError(
                f"{notebook}: not a notebook (invalid JSON: {e})"
            ) from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise KernelError(f"{notebook}: not a Jupyter notebook (no cells)")
    built, info = embed_package(
        nb, package_dir, accelerator=MACHINE_SHAPES.get(machine_shape)
    )
    text = json.dumps(built, indent=1, ensure_ascii=False) + "\n"
    size = len(text.encode("utf-8"))
    if size > MAX_SOURCE_BYTES:
        raise KernelError(
            f"{notebook}: the built kernel is {size / 1e6:.2f} MB ({info['files']} "
            f"embedded modules); Kaggle refuses kernel sources over 1 MB: move data "
            "or outputs out of the notebook"
        )
    info["notebook_bytes"] = size
    return text, info
