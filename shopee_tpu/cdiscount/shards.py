"""Writing the records of a Cdiscount conversion: shards of whole products, each
read from the BSON file by offset, in the order of the file, in a writer process.

``write_products`` plans which products go to which shard, starts (or resumes) the
folder's manifest and hands one task per unfinished shard to the records writer's
processes (``WorkerPool``); ``write_products_shard`` is what a process runs. Only
numpy, pymongo's ``bson`` and the shard writer are imported there.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from shopee_tpu.cdiscount.bson_reader import BsonFormatError, read_product
from shopee_tpu.cdiscount.plan import BsonIndex
from shopee_tpu.data import manifests
from shopee_tpu.data.write.records import shard_params
from shopee_tpu.data.write.shard_writer import ShardWriter
from shopee_tpu.data.write.writer_pool import WorkerPool

__all__ = ["write_products", "write_products_shard", "INDEX"]

INDEX = "index.npz"  # the saved BsonIndex beside the records
_BLOCK = 64  # consecutive products read together by one shard


def write_products_shard(task: tuple) -> dict:
    """Writes one shard from products of a BSON file (runs in a writer process).

    ``task = (params, index, path, ids, offsets, lengths, labels, n_images, keep)``:
    one entry per product in file order, and ``keep`` over their images.
    """
    params, shard_index, path, ids, offsets, lengths, labels, n_images, keep = task
    shard = ShardWriter(params, shard_index)
    pos = 0
    with open(path, "rb") as f:
        for pid, offset, length, label, n in zip(
            ids.tolist(), offsets.tolist(), lengths.tolist(), labels.tolist(),
            n_images.tolist(), strict=True,
        ):  # fmt: skip
            product = read_product(f, offset, length, where=path)
            if product.id != pid or len(product.pictures) != n:
                raise BsonFormatError(
                    f"{path}: byte {offset} holds product {product.id} with "
                    f"{len(product.pictures)} images; the index says {pid} with {n}. "
                    f"The file changed since it was indexed: delete {INDEX} and rerun"
                )
            for i, picture in enumerate(product.pictures):
                if keep[pos + i]:
                    shard.add(picture, label, f"{pid}-{i}", str(pid), f"{pid}-{i}")
            pos += n
    return shard.finish()


def write_products(
    keep, out_dir, prefix, n_shards, *, index: BsonIndex, classes, label_map, test,
    image_size, resize, quality, seed, workers, overwrite, say, extra,
) -> dict:  # fmt: skip
    """Writes the products with a kept image into ``n_shards`` shards in ``out_dir``.

    Args:
        keep: Mask over every image of ``index``: the images to write.
        out_dir, prefix, n_shards: Where, under which name and in how many shards.
        index: The scan of the BSON file.
        classes: Class id per product (-1 for test records).
        label_map, test, image_size, resize, quality, seed: As in ``write_records``.
        workers: Writer processes (1: in this process).
        overwrite: Replace other records in ``out_dir``.
        say: Progress printer.
        extra: Keys added to the manifest.

    Returns:
        The finished manifest.
    """
    image_product = index.image_product
    has = np.zeros(len(index.ids), bool)
    has[image_product[keep]] = True
    rows = np.flatnonzero(has)  # products, file order
    n_shards = max(1, min(n_shards, len(rows)))
    # Blocks of consecutive products dealt round robin: each shard samples the whole
    # file (no class skew even if the file is ordered), yet reads runs of products.
    block = int(np.clip(len(rows) // (n_shards * 8), 1, _BLOCK))
    shard_of = (np.arange(len(rows)) // block) % n_shards
    params = {
        "prefix": prefix,
        "test": test,
        "image_size": image_size,
        "resize": resize,
        "quality": int(quality),
        "seed": int(seed),
        "num_shards": n_shards,
    }
    plan = hashlib.md5()
    for arr in (index.ids[rows], index.offsets[rows], classes[rows], shard_of, keep):
        plan.update(np.ascontiguousarray(arr).tobytes())
    fingerprint = manifests.fingerprint(
        params, label_map, [os.path.basename(index.path), index.size, plan.hexdigest()]
    )
    manifest = manifests.start(
        out_dir, params, label_map, fingerprint, n_shards, overwrite
    )
    manifest.update(extra)
    sp = shard_params(out_dir, params, n_shards)
    todo = [s for s in range(n_shards) if str(s) not in manifest["done"]]
    tasks = _tasks(sp, index, classes, keep, rows, shard_of, n_shards, todo)
    done_before = len(manifest["done"])
    if done_before:
        say(f"{out_dir}: resuming: {done_before} of {n_shards} shards already written")
    t0 = time.monotonic()
    fn = f"{__name__}:write_products_shard"
    if workers == 1 or len(todo) <= 1:
        results = map(write_products_shard, tasks)
        _record_all(results, out_dir, manifest, n_shards, t0, say, prefix)
    else:
        with WorkerPool(min(workers, len(todo)), sp) as pool:
            results = pool.map_unordered(tasks, fn=fn)
            _record_all(results, out_dir, manifest, n_shards, t0, say, prefix)
    return manifests.finish(out_dir, manifest)


def _tasks(sp, index, classes, keep, rows, shard_of, n_shards, todo):
    """Yields each shard's task (built lazily: only one is held at a time)."""
    product_shard = np.full(len(index.ids), -1)
    product_shard[rows] = shard_of
    image_shard = product_shard[index.image_product]
    # Stable sorts keep the file order inside each shard.
    p_order = np.argsort(product_shard, kind="stable")
    i_order = np.argsort(image_shard, kind="stable")
    p_bounds = np.searchsorted(product_shard[p_order], np.arange(n_shards + 1))
    i_bounds = np.searchsorted(image_shard[i_order], np.arange(n_shards + 1))
    for s in todo:
        mine = p_order[p_bounds[s] : p_bounds[s + 1]]
        images = i_order[i_bounds[s] : i_bounds[s + 1]]
        yield (
            sp, s, index.path, index.ids[mine], index.offsets[mine],
            index.lengths[mine], classes[mine], index.n_images[mine], keep[images],
        )  # fmt: skip


def _record_all(results, out_dir, manifest, n_shards, t0, say, prefix) -> None:
    images = 0
    for result in results:
        manifests.record(out_dir, manifest, result)
        images += result["count"]
        done = len(manifest["done"])
        rate = images / max(1e-9, time.monotonic() - t0)
        left = sum(
            1 for s in range(n_shards) if str(s) not in manifest["done"]
        )  # shards still to write
        say(
            f"{prefix} shards {done}/{n_shards}: +{result['count']} images "
            f"({rate:,.0f} images/s this run{', ' + str(left) + ' to go' if left else ''})"
        )
