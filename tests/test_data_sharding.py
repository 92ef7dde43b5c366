"""Several hosts' training pipelines: each reads its own part of the records, the
same part in every epoch, the parts disjoint and equal to a record, and each host
reads only the files its part covers. The images carry their record number in
their pixels (the records of the two-host test), so every batch tells which
records it holds."""

from __future__ import annotations

import shutil

import pytest
from test_multihost_jax import SIDE, ids_of, records_with_ids

from shopee_tpu.data.read.files import list_files, record_counts
from shopee_tpu.data.read.pipeline import load_dataset
from shopee_tpu.data.read.sharding import host_part

N = 100  # records 1..100
BATCH = 4  # rows per host and step


def _epochs(files, hosts: int, epochs: int) -> list[list[list[int]]]:
    """``[host][epoch]`` -> the record ids that host fed in that epoch."""
    steps = N // (BATCH * hosts)
    out = []
    for w in range(hosts):
        ds = load_dataset(
            files,
            training=True,
            image_size=SIDE,
            batch_size=BATCH,
            seed=3,
            num_classes=10,
            num_workers=hosts,
            worker_index=w,
        )
        fed = [ids_of(x) for x, _ in ds.take(steps * epochs).as_numpy_iterator()]
        out.append([sum(fed[e * steps : (e + 1) * steps], []) for e in range(epochs)])
    return out


@pytest.mark.parametrize("shards, hosts", [(5, 2), (2, 3), (1, 2)])
def test_hosts_feed_disjoint_equal_parts_in_every_epoch(tmp_path, shards, hosts):
    files = list_files(records_with_ids(tmp_path / "train", range(1, N + 1), shards))
    fed = _epochs(files, hosts, epochs=4)

    for epoch in range(4):
        seen = [set(host[epoch]) for host in fed]
        for a in range(hosts):
            for b in range(a + 1, hosts):
                assert seen[a].isdisjoint(seen[b]), (epoch, a, b)
    parts = [set(sum(host, [])) for host in fed]
    # Each host feeds its own part in every epoch; the parts split the records
    # into equal shares (to a record), whatever the shard sizes.
    assert set().union(*parts) == set(range(1, N + 1))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # And within a host, each record once per pass of its part.
    first = fed[0][0]
    assert len(first) == len(set(first))


def test_a_host_reads_only_the_files_its_part_covers(tmp_path):
    files = list_files(records_with_ids(tmp_path / "train", range(1, N + 1), 5))
    assert record_counts(files) == [20] * 5
    parts = [host_part(files, 4, w) for w in range(4)]  # 25 records each
    assert [p.files for p in parts] == [
        files[0:2],
        files[1:3],
        files[2:4],
        files[3:5],
    ]
    assert [(p.skip, p.take) for p in parts] == [
        ([0, 0], [20, 5]),
        ([5, 0], [15, 10]),
        ([10, 0], [10, 15]),
        ([15, 0], [5, 20]),
    ]


def test_without_counts_whole_files_or_every_nth_record(tmp_path):
    """Files with no count in their names and no manifest: whole files round robin
    when there are at least as many files as hosts, else every N-th record."""
    source = list_files(records_with_ids(tmp_path / "train", range(1, N + 1), 4))
    bare = tmp_path / "bare"
    bare.mkdir()
    for k, f in enumerate(source):
        shutil.copy(f, bare / f"part{k}.tfrec")
    files = list_files(bare)
    assert [host_part(files, 2, w).files for w in range(2)] == [
        files[0::2],
        files[1::2],
    ]
    assert host_part(files, 5, 0).stride and host_part(files, 5, 0).files == files
    for hosts in (2, 5):
        fed = _epochs(files, hosts, epochs=3)
        for epoch in range(3):
            seen = [set(host[epoch]) for host in fed]
            assert sum(map(len, seen)) == len(set().union(*seen)), (hosts, epoch)
