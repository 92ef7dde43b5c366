"""Files on a local disk or in a Google Cloud Storage bucket (``gs://``), through
one set of functions, with atomic writes.

Kaggle's TPU hosts and pod slices read records and write runs in Google Cloud
Storage as often as on their local disk. Local paths use the standard library;
``gs://`` paths use Google's own client (``google-cloud-storage``, the ``[gcs]``
extra), imported only when a remote path is met. It never imports TensorFlow: on a
TPU VM, importing TensorFlow before ``connect()`` starts Keras on the TensorFlow
backend, and a run folder in a bucket is opened before ``connect()``. The client
honours ``STORAGE_EMULATOR_HOST``, so the same code runs against a storage emulator.

Writes are atomic. A local write goes to a temporary sibling first and is renamed
onto the target. A GCS object is replaced whole or not at all: an upload (one
request, or the last request of a resumable one) creates the new generation only
once all its bytes have arrived and their CRC32C checksum matches, so an
interrupted upload leaves the old object (or none), never half of a new one.
Writes to ``gs://`` therefore upload the finished bytes straight onto the target.

GCS has no folders: a "folder" is the common prefix of its objects. It exists once
it holds an object, ``makedirs`` has nothing to create, and listing a folder that
holds nothing gives ``[]``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob as _glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from shopee_tpu.utils import require_extra

__all__ = [
    "is_remote",
    "join",
    "exists",
    "isdir",
    "glob",
    "makedirs",
    "listdir",
    "remove",
    "rename",
    "read_text",
    "read_bytes",
    "read_json",
    "atomic_path",
    "write_text",
    "write_bytes",
    "write_json",
    "put",
    "local_copy",
]

_WILDCARDS = "*?["


def is_remote(path: str | os.PathLike) -> bool:
    """True for paths with a scheme (``gs://...``), which are not on the local disk."""
    return "://" in os.fspath(path)


def join(folder: str | os.PathLike, name: str) -> str:
    folder = os.fspath(folder)
    return (
        f"{folder.rstrip('/')}/{name}"
        if is_remote(folder)
        else os.path.join(folder, name)
    )


# -- the GCS client -----------------------------------------------------------

_CLIENTS: dict[tuple, Any] = {}


def _client():
    """One client per process (a forked writer must not share its connections)
    and per ``STORAGE_EMULATOR_HOST`` (tests start and stop emulators)."""
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if key not in _CLIENTS:
        _CLIENTS.clear()
        _CLIENTS[key] = _new_client()
    return _CLIENTS[key]


def _new_client():
    require_extra("google.cloud.storage", "gcs", "gs:// paths")
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        # Reading and writing objects needs no project.
        return storage.Client(project=None)
    except DefaultCredentialsError:
        # Like TensorFlow's GCS reader: without credentials, public buckets (a
        # Kaggle dataset's GCS path) can still be read.
        return storage.Client.create_anonymous_client()


def _split(path: str) -> tuple[str, str]:
    """``(bucket, object name)`` of a ``gs://`` path; the name may be ``""``."""
    scheme, _, rest = path.partition("://")
    if scheme != "gs":
        raise ValueError(
            f"{path}: only local paths and gs:// (Google Cloud Storage) are supported"
        )
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{path}: no bucket name after gs://")
    return bucket, key


def _blob(path: str):
    bucket, key = _split(path)
    if not key:
        raise IsADirectoryError(f"{path}: a bucket, not an object")
    return _client().bucket(bucket).blob(key)


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
    """Google's errors for one path, as the built-in ones a local path raises."""
    require_extra("google.cloud.storage", "gcs", "gs:// paths")
    from google.api_core import exceptions

    try:
        yield
    except exceptions.NotFound:
        raise FileNotFoundError(f"{path}: no such object or bucket") from None
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise PermissionError(
            f"{path}: access denied ({e.code}); without Google Cloud credentials "
            "only public buckets can be read: run `gcloud auth application-default "
            "login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def _names(path: str, *, delimiter: str | None = "/") -> tuple[list[str], set[str]]:
    """The object names directly under the folder ``path`` (all of them below it
    without a delimiter) and the sub-folder prefixes, both relative to it."""
    bucket, key = _split(path)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    with _errors(path):
        pages = _client().list_blobs(bucket, prefix=prefix, delimiter=delimiter)
        names = [blob.name[len(prefix) :] for blob in pages]
        folders = {p[len(prefix) :].rstrip("/") for p in pages.prefixes}
    return [n for n in names if n], folders


def _has_objects_under(path: str) -> bool:
    bucket, key = _split(path)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    with _errors(path):
        pages = _client().list_blobs(bucket, prefix=prefix, max_results=1)
        return any(True for _ in pages)


# -- the functions ------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder is there (a ``gs://`` folder: one holding objects)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(path)
    bucket, key = _split(path)
    with _errors(path):
        if not key.strip("/"):
            return _client().bucket(bucket).exists()
        return _blob(path).exists() or _has_objects_under(path)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isdir(path)
    bucket, key = _split(path)
    if not key.strip("/"):
        with _errors(path):
            return _client().bucket(bucket).exists()
    return _has_objects_under(path)


def glob(pattern: str) -> list[str]:
    """The paths matching a ``*``/``?``/``[...]`` pattern, in no set order.

    As with the standard library's ``glob``, a wildcard matches within one path
    segment, and folders match as well as files.
    """
    if not is_remote(pattern):
        return _glob.glob(pattern)
    bucket, key = _split(pattern)
    cut = min((key.find(c) for c in _WILDCARDS if c in key), default=len(key))
    folder = key[:cut].rsplit("/", 1)[0] if "/" in key[:cut] else ""
    parts = key.split("/")
    # One segment below the folder: list only it; deeper: everything under it.
    deep = key.count("/") > folder.count("/") + bool(folder)
    names, folders = _names(f"gs://{bucket}/{folder}", delimiter=None if deep else "/")
    found = set()
    for name in [*names, *folders]:
        segments = (f"{folder}/{name}" if folder else name).split("/")
        head = segments[: len(parts)]
        if len(head) == len(parts) and all(
            fnmatch.fnmatchcase(s, p) for s, p in zip(head, parts, strict=True)
        ):
            found.add(f"gs://{bucket}/" + "/".join(head))
    return sorted(found)


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local folder and its parents; nothing to do in a bucket."""
    path = os.fspath(path)
    if is_remote(path):
        _split(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names of the files and folders directly inside ``path``."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.listdir(path)
    names, folders = _names(path)
    return sorted(set(names) | folders)


def remove(path: str | os.PathLike) -> None:
    """Deletes a file; a missing one is a ``FileNotFoundError``."""
    path = os.fspath(path)
    if not is_remote(path):
        os.remove(path)
        return
    with _errors(path):
        _blob(path).delete()


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves ``source`` onto ``target``, replacing it.

    In a bucket this is a server-side copy (itself atomic: the target is the old
    object or the whole new one), then the source's deletion. Interrupted between
    the two, both exist with the same bytes; the run folder's commit protocol
    finishes such a move on the next start.
    """
    source, target = os.fspath(source), os.fspath(target)
    if not is_remote(source) and not is_remote(target):
        os.replace(source, target)
        return
    if not (is_remote(source) and is_remote(target)):
        raise ValueError(f"cannot rename between a disk and a bucket: {source}")
    src, dst = _blob(source), _blob(target)
    with _errors(source):
        token, _, _ = dst.rewrite(src)
        while token is not None:  # a large object is copied in several calls
            token, _, _ = dst.rewrite(src, token=token)
        src.delete()


def read_bytes(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    with _errors(path):
        return _blob(path).download_as_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike, *, what: str = "") -> Any:
    """Reads a JSON file; a missing or damaged file is one error naming the path
    (and ``what`` it should be)."""
    path = os.fspath(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: missing{'; ' + what if what else ''}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a local temporary path; on success its file replaces ``path``.

    Locally the temporary file is a sibling renamed onto ``path``; for ``gs://`` it
    is uploaded onto ``path`` in one upload. An interrupted write leaves at most a
    ``.tmp-*`` file, never a truncated ``path``. The temporary name ends in
    ``path``'s own name (Keras insists on names ending in ``.weights.h5``).
    """
    path = os.fspath(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix=".tmp-shopee-tpu-") as tmp:
            local = os.path.join(tmp, path.rsplit("/", 1)[-1])
            yield local
            put(local, path)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{os.getpid()}-",
        suffix=f"-{os.path.basename(path)}",
        dir=directory,
    )
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    path = os.fspath(path)
    if is_remote(path):
        with _errors(path):
            _blob(path).upload_from_string(data)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 1) -> None:
    """Writes ``value`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def put(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a local file to ``target`` (local or remote), replacing it whole."""
    local, target = os.fspath(local), os.fspath(target)
    if not is_remote(target):
        with atomic_path(target) as tmp:
            shutil.copyfile(local, tmp)
        return
    with _errors(target):
        _blob(target).upload_from_filename(local)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding ``path``'s content (itself when it is local), for
    readers that need a real file (h5py, Keras)."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=".tmp-shopee-tpu-") as tmp:
        local = os.path.join(tmp, path.rsplit("/", 1)[-1])
        with _errors(path):
            _blob(path).download_to_filename(local)
        yield local
