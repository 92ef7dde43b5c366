"""Which records each host's input pipeline reads, when several hosts share them.

On a pod slice each host feeds its own devices, so each reads its own part of the
records. A host's part is fixed for the whole run: a contiguous range of the
records in file order (the sorted file names), and the ranges of the hosts hold
the same number of records, to one. So:

- the hosts' rows are disjoint in every epoch, not only in the first (a split
  that changed with each pass would hand a record to one host at the end of a
  pass and to another at the start of the next, in one epoch);
- every record weighs the same: with whole files per host, 5 equal files on 2
  hosts would give one host 3 files and the other 2, whose records would then
  come round 1.5 times as often;
- a host reads only the files its range covers: whole files, and part of one at
  either end (the records before its range are read to be skipped: at most one
  file's worth).

The counts come from the file names or the manifest (``data.read.files``). Without
them, whole files go round robin when there are at least as many files as hosts
(the parts may then differ in size), else every host reads every record and keeps
every N-th (``stride``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from shopee_tpu.data.read.decode import read_ids_labels
from shopee_tpu.data.read.files import record_counts

__all__ = ["Part", "host_part", "part_sizes"]


@dataclass(frozen=True)
class Part:
    """What one host reads.

    Attributes:
        files: The files it reads, in file order.
        skip: Records to skip at the start of each file.
        take: Records to read from each after those (-1: to the end).
        stride: Every host reads ``files`` (all of them) in one fixed order and
            keeps every N-th record, from its index on.
    """

    files: list[str]
    skip: list[int]
    take: list[int]
    stride: bool = False


def _whole(files: list[str], stride: bool = False) -> Part:
    return Part(list(files), [0] * len(files), [-1] * len(files), stride)


def host_part(files: list[str], workers: int, index: int) -> Part:
    """Host ``index``'s part of ``files`` (sorted, as ``list_files`` gives them)
    when ``workers`` hosts share them."""
    if not 0 <= index < workers:
        raise ValueError(f"worker_index {index} not in [0, {workers})")
    if workers == 1:
        return _whole(files)
    try:
        counts = record_counts(files)
    except ValueError:
        if len(files) >= workers:
            return _whole(files[index::workers])
        return _whole(files, stride=True)
    lo, hi = _bounds(sum(counts), workers, index)
    part, skip, take, start = [], [], [], 0
    for path, n in zip(files, counts, strict=True):
        first, last = max(lo, start), min(hi, start + n)
        if first < last:
            part.append(path)
            skip.append(first - start)
            take.append(last - first)
        start += n
    return Part(part, skip, take)


def _bounds(total: int, workers: int, index: int) -> tuple[int, int]:
    return total * index // workers, total * (index + 1) // workers


def part_sizes(
    files: list[str], workers: int, keep_ids: Collection[str] | None = None
) -> list[int]:
    """The records each host's part holds (of ``keep_ids`` only, when given).

    Raises:
        ValueError: The record counts are unknown (no count in the file names and
            no manifest); they are never scanned implicitly.
    """
    total = sum(record_counts(files))
    if keep_ids is None:
        return [len(range(*_bounds(total, workers, w))) for w in range(workers)]
    keep = {str(k) for k in keep_ids}
    if workers == 1:
        return [len(keep)]  # each kept id is in the files exactly once
    # Which kept ids each host meets needs the ids in file order (a scan).
    kept = read_ids_labels(files)["id"].isin(keep).to_numpy()
    return [int(kept[slice(*_bounds(total, workers, w))].sum()) for w in range(workers)]
