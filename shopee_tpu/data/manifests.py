"""The ``manifest.json`` of a records folder, and resuming a write from it.

The manifest holds the counts per shard and per class, the label map, the schema,
the skipped images with their reasons, the write settings and a fingerprint of the
planned shards. It is rewritten atomically after every finished shard, so a killed
run can be continued: a rerun with the same fingerprint keeps the shards listed as
done; a rerun with other settings or data is refused unless told to overwrite.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from shopee_tpu import fs

__all__ = [
    "MANIFEST",
    "FORMAT",
    "FEATURES",
    "read_manifest",
    "manifest_beside",
    "manifests_of",
    "summary_lines",
]

MANIFEST = "manifest.json"
FORMAT = "shopee_tpu.records/1"
FEATURES = {
    "image": "bytes: JPEG, or PNG (lossless) when at most 64 px a side",
    "label": "int64: class id, -1 when unlabeled",
    "id": "bytes: image id (file name)",
    "group": "bytes: product id, empty when none",
    "md5": "bytes: hex MD5 of the original image file",
}
_PARAM_KEYS = (
    "prefix",
    "test",
    "image_size",
    "resize",
    "quality",
    "seed",
    "num_shards",
)


def read_manifest(dir_or_file: str | os.PathLike) -> dict:
    """Reads ``manifest.json`` from a records folder (local or gs://) or its path.

    Raises:
        FileNotFoundError: There is none.
    """
    path = os.fspath(dir_or_file)
    if not path.endswith(".json"):
        path = fs.join(path or ".", MANIFEST)
    if not fs.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} at {path}")
    return fs.read_json(path)


def manifest_beside(record_file: str | os.PathLike) -> dict:
    """The manifest of the folder holding ``record_file``; ``{}`` when that folder
    has none (records written by other tools)."""
    return manifests_of([os.fspath(record_file)])[_folder(os.fspath(record_file))]


def manifests_of(record_files: Sequence[str]) -> dict[str, dict]:
    """``{folder: manifest}`` for the folders holding ``record_files``, each read
    once; ``{}`` for a folder without one."""
    out: dict[str, dict] = {}
    for path in record_files:
        folder = _folder(path)
        if folder not in out:
            try:
                out[folder] = read_manifest(folder)
            except FileNotFoundError:
                out[folder] = {}
    return out


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def fingerprint(params: dict, label_map, plan) -> str:
    text = json.dumps([params, label_map, plan], sort_keys=True, default=str)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def start(out_dir, params, label_map, fingerprint, n_shards, overwrite) -> dict:
    """Checks ``out_dir`` and returns the manifest to continue (or a fresh one)."""
    os.makedirs(out_dir, exist_ok=True)
    old = None
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        old = read_manifest(out_dir)
    ours = glob.glob(os.path.join(out_dir, "*.tfrec"))
    if old is not None and old.get("fingerprint") == fingerprint:
        done = {
            k: r
            for k, r in old.get("done", {}).items()
            if r["file"] is None or os.path.exists(os.path.join(out_dir, r["file"]))
        }
        old["done"] = done
        _clean(out_dir, keep={r["file"] for r in done.values()}, params=params)
        return old
    if (old is not None or ours) and not overwrite:
        raise ValueError(
            f"{out_dir} {_difference(old, params, ours)}; pass "
            "overwrite=True (--overwrite) to replace it"
        )
    if old is not None or ours:
        _clean(out_dir, keep=set(), params=params, everything=True)
    manifest = {
        "format": FORMAT,
        "schema": "shopee_tpu",
        "features": FEATURES,
        **params,
        "label_map": label_map,
        "num_classes": len(set(label_map.values())) if label_map else 0,
        "fingerprint": fingerprint,
        "complete": False,
        "done": {},
    }
    _save(out_dir, manifest)
    return manifest


def _difference(old, params, files) -> str:
    if old is None:
        return f"already holds {len(files)} .tfrec files without a {MANIFEST}"
    changed = [
        f"{k}: {old.get(k)!r} -> {params[k]!r}"
        for k in _PARAM_KEYS
        if old.get(k) != params[k]
    ]
    if changed:
        return (
            "already holds records written with other settings ("
            + ", ".join(changed)
            + ")"
        )
    return "already holds a different dataset (other images, labels or label map)"


def _clean(out_dir, keep: set, params: dict, everything: bool = False) -> None:
    """Removes temp files and shard files other than the finished ones to keep.

    ``everything`` (overwrite) removes every ``.tfrec`` file in ``out_dir``, so no
    record of the replaced dataset can be read along with the new one.
    """
    patterns = [
        ".*.tfrec.tmp-*",
        "*.tfrec" if everything else f"{params['prefix']}-*.tfrec",
    ]
    for pattern in patterns:
        for path in glob.glob(os.path.join(out_dir, pattern)):
            if os.path.basename(path) not in keep:
                os.remove(path)


def empty_result(index: int) -> dict:
    return {"index": index, "file": None, "count": 0, "class_counts": {}, "skipped": []}


def record(out_dir: str, manifest: dict, result: dict) -> None:
    manifest["done"][str(result["index"])] = result
    _save(out_dir, _summarise(manifest))


def _summarise(manifest: dict) -> dict:
    names = {v: k for k, v in manifest["label_map"].items()}
    results = sorted(manifest["done"].values(), key=lambda r: r["index"])
    shards, per_shard, classes, skipped = {}, {}, {}, []
    channels, formats = 0, {}
    for r in results:
        skipped.extend(r["skipped"])
        channels = max(channels, r.get("channels", 0))
        for name, n in r.get("formats", {}).items():
            formats[name] = formats.get(name, 0) + n
        if r["file"] is None:
            continue
        shards[r["file"]] = r["count"]
        per_shard[r["file"]] = {
            names.get(int(c), c): n for c, n in r["class_counts"].items()
        }
        for c, n in r["class_counts"].items():
            name = names.get(int(c), "unlabeled" if int(c) < 0 else c)
            classes[name] = classes.get(name, 0) + n
    manifest.update(
        shards=shards,
        shard_class_counts=per_shard,
        class_counts=classes,
        total=sum(shards.values()),
        skipped=sorted(skipped, key=lambda s: s["path"]),
        num_skipped=len(skipped),
    )
    if channels:  # shards written before channels were counted leave it out
        manifest.update(channels=channels, image_formats=dict(sorted(formats.items())))
    return manifest


def finish(out_dir: str, manifest: dict) -> dict:
    manifest = _summarise(manifest)
    manifest["complete"] = True
    _save(out_dir, manifest)
    if manifest["total"] == 0:
        reasons = "; ".join(
            f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:3]
        )
        raise ValueError(
            f"no usable images: all {manifest['num_skipped']} were skipped ({reasons})"
        )
    return manifest


def summary_lines(manifest: dict, out_dir: str, *, limit: int = 10) -> list[str]:
    """What a write did, for a person: one line for the records, one per skipped
    image (the first ``limit``; all of them are in the manifest)."""
    channels = {1: ", grey", 3: ", colour"}.get(manifest.get("channels"), "")
    formats = "/".join(manifest.get("image_formats", {}))
    lines = [
        f"wrote {manifest['total']} records in {len(manifest['shards'])} shards to "
        f"{out_dir} ({manifest['num_skipped']} skipped{channels}"
        f"{', ' + formats if formats else ''})"
    ]
    skipped = manifest["skipped"]
    lines += [f"skipped {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(
            f"... and {len(skipped) - limit} more skipped, listed in "
            f"{os.path.join(out_dir, MANIFEST)}"
        )
    return lines


def _save(out_dir: str, manifest: dict[str, Any]) -> None:
    fs.write_text(
        os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n"
    )
