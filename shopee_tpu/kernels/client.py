"""``shopee-tpu kernel push`` and ``kernel status`` through the real ``kaggle`` client.

``import kaggle`` authenticates at import time, and older clients ``exit(1)`` when no
credentials are found, so the client is imported here, inside the two commands,
and never by ``import shopee_tpu``. Its help text is swallowed; our message says how
to set credentials and prints nothing from the environment. This module never
reads credentials itself: the client does, from ``KAGGLE_USERNAME``/``KAGGLE_KEY``,
``KAGGLE_API_TOKEN``, ``~/.kaggle/kaggle.json`` or ``kaggle auth login``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from shopee_tpu.kernels.build import EMBED_TAG
from shopee_tpu.kernels.metadata import (
    METADATA_FILE,
    KernelError,
    KernelMetadataError,
    apply_accelerator,
    load_metadata,
    validate_metadata,
)

__all__ = [
    "KaggleClientError",
    "KernelStatus",
    "PushResult",
    "kernel_status",
    "parse_status",
    "push_kernel",
]

INSTALL_HINT = (
    "the kaggle client is not installed: pip install 'shopee_tpu[kaggle]' "
    "(or pip install 'kaggle>=1.7')"
)
CREDENTIALS_HINT = (
    "no Kaggle credentials found. Create an API token at "
    "https://www.kaggle.com/settings/api, then either save kaggle.json to "
    "~/.kaggle/kaggle.json (chmod 600), or export KAGGLE_USERNAME and KAGGLE_KEY, "
    "or export KAGGLE_API_TOKEN (or run `kaggle auth login`)"
)

# kagglesdk KernelWorkerStatus names; clients <= 1.6 printed them in lower case.
STATUSES = (
    "queued",
    "running",
    "complete",
    "error",
    "cancel_requested",
    "cancel_acknowledged",
    "new_script",
)
FAILED = ("error", "cancel_requested", "cancel_acknowledged")


class KaggleClientError(KernelError):
    """The kaggle client is missing, has no credentials, or Kaggle refused."""


@dataclass
class PushResult:
    """What Kaggle answered to a push."""

    slug: str
    version: int | None
    url: str
    ref: str = ""
    invalid: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class KernelStatus:
    """A kernel's latest session: ``status`` is one of ``STATUSES``."""

    slug: str
    status: str
    failure_message: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILED


def parse_status(value) -> str:
    """Normalises a kernel status from any client version.

    Accepts ``"complete"`` (kaggle <= 1.6), ``"KernelWorkerStatus.COMPLETE"`` (the
    enum as newer clients print it), the enum itself, ``"COMPLETE"``, or a whole
    ``kaggle kernels status`` line (``me/x has status "complete"``).

    Returns:
        One of ``STATUSES``, e.g. ``"complete"``.
    """
    if hasattr(value, "name") and not isinstance(value, str):
        value = value.name
    if isinstance(value, dict):
        value = value.get("status", "")
    text = str(value).strip()
    quoted = re.search(r'has status "([^"]*)"', text)
    if quoted:
        text = quoted.group(1)
    name = text.rsplit(".", 1)[-1].strip().lower()
    name = name.removeprefix("kernel_worker_status_")
    if name not in STATUSES:
        raise KaggleClientError(f"unknown kernel status {value!r}")
    return name


def _kaggle_api():
    """The authenticated ``KaggleApi``, imported only now."""
    quiet = io.StringIO()
    try:
        # The client prints its own help (and older ones exit) without credentials.
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            import kaggle
    except SystemExit:
        raise KaggleClientError(CREDENTIALS_HINT) from None
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "kaggle":  # kaggle there, a dependency not
            raise KaggleClientError(
                f"the kaggle client failed to import: {e}"
            ) from None
        raise KaggleClientError(INSTALL_HINT) from None
    except ImportError as e:
        raise KaggleClientError(f"the kaggle client failed to import: {e}") from None
    api = kaggle.api
    if getattr(api, "_authenticated", True) is False:
        raise KaggleClientError(CREDENTIALS_HINT)
    return api


def _response_field(response, *names, default=None):
    for name in names:
        if isinstance(response, dict) and name in response:
            return response[name]
        if not isinstance(response, dict) and hasattr(response, name):
            return getattr(response, name)
    return default


def _notebook_carries_package(path: str) -> bool | None:
    """True/False for a notebook that imports shopee_tpu; None when it does not."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    cells = nb.get("cells", [])
    tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
    sources = "".join(
        "".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"
    )
    if not re.search(r"^\s*(import|from)\s+shopee_tpu\b", sources, re.MULTILINE):
        return None
    return EMBED_TAG in tags


def push_kernel(
    folder: str | os.PathLike,
    *,
    accelerator: str | None = None,
    timeout: int | None = None,
) -> PushResult:
    """Pushes a kernel folder (from ``build_kernel``) with the kaggle client.

    The folder's metadata is checked first; ``accelerator`` then sets
    ``machine_shape`` and the GPU/TPU flags together, on a temporary copy (the
    folder itself is not changed).

    Args:
        folder: Holds ``kernel-metadata.json`` and its ``code_file``.
        accelerator: ``TpuV5E8``, ``NvidiaTeslaT4`` or ``none`` (CPU).
        timeout: Session limit in seconds (the client's ``-t``).

    Raises:
        KernelMetadataError: Bad metadata (the key named), before any network call.
        KaggleClientError: No client, no credentials, or Kaggle refused the push.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such kernel folder")
    where = os.path.join(folder, METADATA_FILE)
    meta = validate_metadata(load_metadata(folder), folder, where=where)
    if accelerator is not None:
        meta = validate_metadata(apply_accelerator(meta, accelerator), folder)
    code = os.path.join(folder, meta["code_file"])
    if meta["kernel_type"] == "notebook" and _notebook_carries_package(code) is False:
        raise KernelMetadataError(
            "code_file",
            f"{code} imports shopee_tpu but does not carry it, so it fails on "
            "Kaggle; build the folder with `shopee-tpu kernel build` first",
            where,
        )
    api = _kaggle_api()
    with tempfile.TemporaryDirectory(prefix="shopee-tpu-push-") as tmp:
        staged = os.path.join(tmp, meta["code_file"])
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        shutil.copyfile(code, staged)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        try:
            response = api.kernels_push(tmp, timeout=timeout)
        except ValueError as e:  # the client's own metadata checks
            raise KaggleClientError(f"kaggle client refused {folder}: {e}") from None
        except OSError as e:  # requests' errors: no network, 401, 5xx
            raise KaggleClientError(f"push of {meta.get('id')} failed: {e}") from None
    error = _response_field(response, "error")
    if error:
        raise KaggleClientError(f"Kaggle refused the push of {meta['id']}: {error}")
    invalid = {}
    for kind in ("tags", "dataset_sources", "competition_sources", "kernel_sources"):
        camel = "invalid" + "".join(p.title() for p in kind.split("_"))
        items = _response_field(response, f"invalid_{kind}", camel, default=None)
        if items:
            invalid[kind] = list(items)
    return PushResult(
        slug=meta.get("id") or str(meta.get("id_no")),
        version=_response_field(response, "version_number", "versionNumber"),
        url=_response_field(response, "url", default="") or "",
        ref=_response_field(response, "ref", default="") or "",
        invalid=invalid,
    )


def kernel_status(slug: str) -> KernelStatus:
    """The status of a kernel's latest session (``owner/slug``).

    Raises:
        KaggleClientError: No client or credentials, or the slug is not
            ``owner/slug``.
    """
    parts = str(slug).split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise KaggleClientError(f"kernel {slug!r} must be shaped owner/slug")
    api = _kaggle_api()
    try:
        response = api.kernels_status(slug)
    except (ValueError, OSError) as e:  # bad slug; requests' errors
        raise KaggleClientError(f"status of {slug} failed: {e}") from None
    message = _response_field(response, "failure_message", "failureMessage")
    return KernelStatus(
        slug=slug,
        status=parse_status(_response_field(response, "status", default="")),
        failure_message=message or "",
    )
