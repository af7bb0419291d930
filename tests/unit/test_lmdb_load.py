"""The embedded store loads a version in one write transaction, each flush's keys put in
byte order (``LmdbStore.write_all``): parts whose keys interleave, in many flushes, come
back whole; a load that fails writes nothing of the version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kv_export.encoding import bucket_count, encode_keys, unpack_value
from kv_export.export import export_parts, load_parts
from kv_export.lmdb_store import LmdbStore
from kv_export.state import NewVersion

ROWS = 3_000
PARTS = 3


def new(run: str) -> NewVersion:
    return NewVersion(
        run_id=run, expected_keys=ROWS, buckets=bucket_count(ROWS), outputs=["p"],
        model_name="m", model_version="1", scored_at="2026-12-08T00:00:00+00:00",
        key_column="k", key_type="int",
    )  # fmt: skip


def interleaved_parts(folder: Path) -> list[Path]:
    """Each part sorted by key, the parts' keys interleaved (every PARTS-th key), as a
    run's parts are when the input's files are not split by key range: in byte order
    ("10" < "9") the keys of one flush land all over the store."""
    folder.mkdir()
    paths = []
    for i in range(PARTS):
        keys = np.arange(i, ROWS, PARTS, dtype=np.int64)
        path = folder / f"part-{i}.parquet"
        pq.write_table(pa.table({"k": keys, "p": (keys / 2).astype(np.float32)}), path)
        paths.append(path)
    return paths


def test_a_load_of_many_flushes_is_one_transaction_and_comes_back_whole(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "store")
    parts = interleaved_parts(tmp_path / "parts")
    info = store.begin_version("ns", new("run-1"))
    before = store._env.info()["last_txnid"]
    assert load_parts(store, "ns", info, parts, flush_rows=700) == ROWS  # 5 flushes
    assert store._env.info()["last_txnid"] == before + 1
    keys = list(range(ROWS))
    found = store.get_many("ns", info, encode_keys(keys))
    assert [unpack_value(v, ["p"])["p"] if v else None for v in found] == [k / 2 for k in keys]
    done = store.complete_version("ns", info.version, ROWS)
    assert done.state == "complete" and done.key_count == ROWS


def test_a_load_that_fails_writes_nothing_of_the_version(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "store")
    parts = interleaved_parts(tmp_path / "parts")
    parts[-1].write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        export_parts(store, "ns", new("run-1"), parts, flush_rows=700)
    (info,) = store.state("ns").versions.values()
    assert info.state == "loading"
    assert store.get_many("ns", info, encode_keys(range(ROWS))) == [None] * ROWS
