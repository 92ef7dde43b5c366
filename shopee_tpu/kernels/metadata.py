"""``kernel-metadata.json``: the template, ``--set`` overrides and validation.

Validation applies the rules ``kaggle kernels push`` applies (kaggle 2.2.5,
``KaggleApi.kernels_push``), before anything is written or sent, and a few the
client leaves to the server or only warns about:

- ``title`` at least 5 characters and slugifying to the slug of ``id`` (the client
  only warns; a mismatch gives a kernel URL other than the one you asked for);
- ``id`` shaped ``owner/slug`` with a slug of at least 5 characters, no version;
- ``code_file`` exists; ``language`` and ``kernel_type`` from the client's lists;
- booleans ``true``/``false``; ``enable_internet`` given explicitly (the client's
  default is *on*, the template's intent is *off*);
- sources shaped ``owner/slug`` (datasets, kernels) and
  ``owner/model/framework/variation/version`` (models);
- ``machine_shape`` one of the accelerator ids, consistent with ``enable_gpu`` /
  ``enable_tpu`` (``enable_gpu`` alone gets a retired P100);
- no ``docker_image(_pinning_type)`` with a TPU ``machine_shape``: a TPU v5e-8
  session runs on a TPU VM with no image, so a pinned one wins and the kernel runs
  on the CPU image (kaggle-cli#1197; so does the notebook's ``metadata.kaggle``,
  which ``kernel build`` drops).

Every error names the key. Unknown keys are errors too, so a typo is not ignored.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ACCELERATORS",
    "KernelError",
    "KernelMetadataError",
    "METADATA_FILE",
    "MACHINE_SHAPES",
    "RETIRED_SHAPES",
    "apply_accelerator",
    "apply_overrides",
    "load_metadata",
    "slugify",
    "validate_metadata",
]

METADATA_FILE = "kernel-metadata.json"
PLACEHOLDER_OWNER = "your-kaggle-username"

_BOOLS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
_LISTS = (
    "dataset_sources",
    "competition_sources",
    "kernel_sources",
    "model_sources",
    "keywords",
)
_STRINGS = (
    "id",
    "title",
    "code_file",
    "language",
    "kernel_type",
    "machine_shape",
    "docker_image",
    "docker_image_pinning_type",
)
KNOWN_KEYS = ("id_no", *_STRINGS, *_BOOLS, *_LISTS)

LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")
PINNING_TYPES = ("original", "latest")

# machine_shape ids from Kaggle/kaggle-cli docs/kernels.md ("as of Feb 2026"), sent
# unchecked; PR #1198: NvidiaTeslaT4 is "GPU T4 x2", TpuV5E8 is "TPU v5e-8".
MACHINE_SHAPES = {
    **dict.fromkeys(
        ("NvidiaTeslaT4", "NvidiaTeslaT4Highmem", "NvidiaL4", "NvidiaL4X1")
        + ("NvidiaTeslaA100", "NvidiaH100", "NvidiaRtxPro6000"),
        "gpu",
    ),
    **dict.fromkeys(("TpuV5E8", "TpuV6E8"), "tpu"),
}
# What the server runs instead (kaggle 2.2.5, _RETIRED_ACCELERATORS).
RETIRED_SHAPES = {
    "NvidiaTeslaP100": "runs on NvidiaTeslaT4 instead",
    "TpuV38": "runs on TpuV5E8 instead",
    "Tpu1VmV38": "runs on TpuV5E8 instead",
    "TpuV232": "runs on CPU instead",
    "TpuV2256": "runs on CPU instead",
}
# `shopee-tpu kernel push --accelerator`: the three choices the notebook editor offers.
ACCELERATORS = ("TpuV5E8", "NvidiaTeslaT4", "none")


class KernelError(ValueError):
    """Something about a kernel folder, its metadata or the Kaggle client is wrong."""


class KernelMetadataError(KernelError):
    """A metadata key or value is wrong; ``key`` names it."""

    def __init__(self, key: str, message: str, where: str = ""):
        self.key = key
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{key}: {message}")


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title (python-slugify, as the client uses).

    Falls back to the same rules for plain ASCII titles when python-slugify (a
    dependency of the kaggle client) is not installed.
    """
    try:
        from slugify import slugify as client_slugify
    except ImportError:
        text = re.sub(r"'+", "-", str(title))
        text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
        text = re.sub(r"[^-a-z0-9]+", "-", text)
        return re.sub(r"-{2,}", "-", text).strip("-")
    return client_slugify(str(title))


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a ``kernel-metadata.json`` (file or the folder holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(path):
        raise KernelError(f"{path}: no kernel metadata file")
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise KernelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise KernelError(f"{path}: must hold a JSON object")
    return meta


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise KernelMetadataError(key, f"must be true or false, got {value!r}")


def _parse_value(key: str, raw: str) -> Any:
    """A ``--set`` value, typed by its key."""
    raw = raw.strip()
    if key in _BOOLS:
        return _parse_bool(key, raw)
    if key in _LISTS:
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                raise KernelMetadataError(key, f"bad JSON list ({e})") from None
            return value
        return [item.strip() for item in raw.split(",") if item.strip()]
    if key == "id_no":
        try:
            return int(raw)
        except ValueError:
            raise KernelMetadataError(key, f"must be an integer, got {raw!r}") from None
    return raw


def apply_overrides(
    meta: Mapping[str, Any], sets: Iterable[str]
) -> tuple[dict[str, Any], set[str]]:
    """Applies ``key=value`` strings (``--set``) to a metadata mapping.

    Lists take comma-separated items (``dataset_sources=me/a,me/b``; empty clears)
    or a JSON list; booleans ``true``/``false``.

    Returns:
        The new metadata and the set of keys that were given.
    """
    out = dict(meta)
    given: set[str] = set()
    for item in sets:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise KernelError(f"--set expects key=value, got {item!r}")
        if key not in KNOWN_KEYS:
            raise KernelMetadataError(
                key, f"unknown metadata key; known keys: {', '.join(KNOWN_KEYS)}"
            )
        out[key] = _parse_value(key, raw)
        given.add(key)
    return out, given


def _canonical_shape(value: Any) -> str:
    """``machine_shape`` with its canonical spelling; ``""`` for none."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KernelMetadataError("machine_shape", f"must be a string, got {value!r}")
    text = value.strip()
    if text.lower() in ("", "none"):
        return ""
    known = {k.lower(): k for k in (*MACHINE_SHAPES, *RETIRED_SHAPES)}
    shape = known.get(text.lower())
    if shape in RETIRED_SHAPES:
        raise KernelMetadataError(
            "machine_shape", f"{shape} is retired: Kaggle {RETIRED_SHAPES[shape]}"
        )
    if shape is None:
        raise KernelMetadataError(
            "machine_shape",
            f"unknown accelerator {text!r}; use one of {', '.join(MACHINE_SHAPES)} "
            "or leave it empty for CPU",
        )
    return shape


def _sync_flags(meta: dict[str, Any], given: set[str]) -> None:
    """Makes ``enable_gpu``/``enable_tpu`` follow ``machine_shape``, except flags
    the user set explicitly (those must agree, or validation fails)."""
    kind = MACHINE_SHAPES.get(meta.get("machine_shape") or "")
    if kind is None and "machine_shape" not in given:
        return  # no accelerator asked for: the template's flags are checked as they are
    for flag, wanted in (("enable_gpu", kind == "gpu"), ("enable_tpu", kind == "tpu")):
        if flag not in given:
            meta[flag] = wanted


def apply_accelerator(meta: Mapping[str, Any], accelerator: str) -> dict[str, Any]:
    """Sets ``machine_shape`` and the GPU/TPU flags for ``--accelerator``.

    Args:
        meta: Kernel metadata.
        accelerator: ``TpuV5E8``, ``NvidiaTeslaT4`` or ``none`` (CPU); any other
            ``machine_shape`` id is accepted too.
    """
    out = dict(meta)
    shape = _canonical_shape(accelerator)
    out["machine_shape"] = shape
    kind = MACHINE_SHAPES.get(shape)
    out["enable_gpu"] = kind == "gpu"
    out["enable_tpu"] = kind == "tpu"
    return out


def _check_string(key: str, meta: Mapping[str, Any], required: bool) -> str | None:
    value = meta.get(key)
    if value is None or value == "":
        if required:
            raise KernelMetadataError(key, "is required")
        return None
    if not isinstance(value, str):
        raise KernelMetadataError(key, f"must be a string, got {value!r}")
    return value


def _check_id(meta: Mapping[str, Any]) -> None:
    kernel_id = _check_string("id", meta, required="id_no" not in meta)
    if "id_no" in meta and not isinstance(meta["id_no"], int):
        raise KernelMetadataError("id_no", f"must be an integer, got {meta['id_no']!r}")
    if kernel_id is None:
        return
    parts = kernel_id.split("/")
    if len(parts) == 3:
        raise KernelMetadataError(
            "id", f"{kernel_id!r} must not contain a version (use owner/slug)"
        )
    if len(parts) != 2 or not all(parts):
        raise KernelMetadataError("id", f"{kernel_id!r} must be shaped owner/slug")
    owner, slug = parts
    if owner == PLACEHOLDER_OWNER:
        raise KernelMetadataError(
            "id", f"replace {owner!r} with your Kaggle username (--set id=USER/{slug})"
        )
    if len(slug) < 5:
        raise KernelMetadataError("id", f"slug {slug!r} must be at least 5 characters")
    if slugify(slug) != slug.lower():
        raise KernelMetadataError(
            "id", f"slug {slug!r} is not a URL slug (try {slugify(slug)!r})"
        )


def _check_title(meta: Mapping[str, Any]) -> None:
    title = _check_string("title", meta, required="id_no" not in meta)
    if title is None:
        return
    if len(title) < 5:
        raise KernelMetadataError("title", f"{title!r} must be at least 5 characters")
    kernel_id = meta.get("id")
    if kernel_id:
        slug = kernel_id.split("/")[1]
        if slugify(title) != slug.lower():
            raise KernelMetadataError(
                "title",
                f"{title!r} slugifies to {slugify(title)!r}, not to the id's slug "
                f"{slug!r}; Kaggle names the kernel after its title",
            )


def _check_sources(meta: Mapping[str, Any]) -> None:
    shapes = {
        "dataset_sources": (2, "owner/dataset-slug"),
        "kernel_sources": (2, "owner/kernel-slug"),
        "model_sources": (5, "owner/model/framework/variation/version"),
        "competition_sources": (1, "competition-slug"),
        "keywords": (None, "a tag"),
    }
    for key, (n_parts, shape) in shapes.items():
        value = meta.get(key, [])
        if not isinstance(value, list):
            raise KernelMetadataError(key, f"must be a list, got {value!r}")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise KernelMetadataError(key, f"{item!r} must be {shape}")
            if n_parts is None:
                continue
            parts = item.split("/")
            if len(parts) != n_parts or not all(parts):
                raise KernelMetadataError(key, f"{item!r} must be shaped {shape}")
            if key == "kernel_sources" and len(parts[1]) < 5:
                raise KernelMetadataError(
                    key, f"{item!r}: a kernel slug has at least 5 characters"
                )
            if key == "model_sources" and not parts[4].isdigit():
                raise KernelMetadataError(
                    key, f"{item!r}: the version (last part) must be an integer"
                )


def _check_accelerator(meta: dict[str, Any]) -> None:
    shape = meta["machine_shape"]
    kind = MACHINE_SHAPES.get(shape)
    gpu, tpu = meta.get("enable_gpu", False), meta.get("enable_tpu", False)
    if gpu and tpu:
        raise KernelMetadataError("enable_tpu", "enable_gpu and enable_tpu are both on")
    if tpu and kind != "tpu":
        raise KernelMetadataError(
            "machine_shape",
            f"enable_tpu needs a TPU machine_shape (TpuV5E8), got {shape or 'none'}",
        )
    if gpu and kind != "gpu":
        raise KernelMetadataError(
            "machine_shape",
            f"enable_gpu needs a GPU machine_shape (NvidiaTeslaT4 = T4 x2), got "
            f"{shape or 'none'}; without it Kaggle picks a retired P100",
        )
    if kind == "tpu" and not tpu:
        raise KernelMetadataError("enable_tpu", f"must be true for {shape}")
    if kind == "tpu" and meta.get("docker_image"):
        raise KernelMetadataError(
            "docker_image",
            f"pins {meta['docker_image']!r}, and a {shape} session has no image of "
            "its own: the pinned one wins and the kernel runs on the CPU image "
            "(kaggle-cli#1197); remove docker_image",
        )
    if kind == "tpu" and (pinning := meta.get("docker_image_pinning_type")):
        raise KernelMetadataError(
            "docker_image_pinning_type",
            f"{pinning!r} pins the session to a container image, and a {shape} "
            "session runs on a TPU VM with no image of its own: a pinned CPU/GPU "
            "image wins and the kernel runs without the TPU (kaggle-cli#1197); "
            "remove docker_image_pinning_type",
        )
    if kind == "gpu" and not gpu:
        raise KernelMetadataError("enable_gpu", f"must be true for {shape}")


def validate_metadata(
    meta: Mapping[str, Any],
    folder: str | os.PathLike | None = None,
    *,
    given: Iterable[str] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """Checks kernel metadata; returns it normalised (booleans as booleans,
    ``machine_shape`` spelled canonically, GPU/TPU flags following it).

    Args:
        meta: The metadata mapping.
        folder: The folder ``code_file`` is relative to; ``None`` skips the check
            that it exists.
        given: For a build: the keys the user set explicitly (``--set``); the
            GPU/TPU flags not among them follow ``machine_shape``. ``None`` (a
            folder about to be pushed) derives nothing: flags that disagree with
            ``machine_shape`` are errors.
        where: A file name to prefix errors with.

    Raises:
        KernelMetadataError: The first problem, naming its key.
    """
    try:
        out = dict(meta)
        unknown = [k for k in out if k not in KNOWN_KEYS]
        if unknown:
            raise KernelMetadataError(
                unknown[0],
                f"unknown metadata key; known keys: {', '.join(KNOWN_KEYS)}",
            )
        _check_id(out)
        _check_title(out)
        code_file = _check_string("code_file", out, required=True)
        if folder is not None and not os.path.isfile(
            os.path.join(os.fspath(folder), code_file)
        ):
            raise KernelMetadataError(
                "code_file", f"{os.path.join(os.fspath(folder), code_file)} not found"
            )
        for key, allowed in (
            ("language", LANGUAGES),
            ("kernel_type", KERNEL_TYPES),
        ):
            value = _check_string(key, out, required=True)
            if value not in allowed:
                raise KernelMetadataError(
                    key, f"{value!r} is not one of {', '.join(allowed)}"
                )
        pinning = _check_string("docker_image_pinning_type", out, required=False)
        if pinning is not None and pinning not in PINNING_TYPES:
            raise KernelMetadataError(
                "docker_image_pinning_type",
                f"{pinning!r} is not one of {', '.join(PINNING_TYPES)}",
            )
        _check_string("docker_image", out, required=False)
        if "enable_internet" not in out:
            raise KernelMetadataError(
                "enable_internet",
                "give it explicitly (false for internet-off competitions); "
                "the kaggle client's default is true",
            )
        for key in _BOOLS:
            if key in out:
                out[key] = _parse_bool(key, out[key])
        out["machine_shape"] = _canonical_shape(out.get("machine_shape"))
        if given is not None:
            _sync_flags(out, set(given))
        _check_accelerator(out)
        _check_sources(out)
    except KernelMetadataError as e:
        if where:
            raise KernelMetadataError(e.key, str(e)[len(e.key) + 2 :], where) from None
        raise
    return out
