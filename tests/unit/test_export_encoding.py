"""The bulk-load encoding and the retention rules, without a server."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from redis.connection import Connection
from redis.crc import key_slot

from kv_export.encoding import (
    BUCKETS_PER_GROUP,
    crc32_many,
    encode_keys,
    redis_bucket_groups,
    redis_bucket_key,
    redis_hset_payload,
    redis_state_key,
    text_keys,
)
from kv_export.state import NamespaceState, NewVersion


def test_column_keys_are_the_same_text_as_single_keys() -> None:
    ints = [0, 7, -3, 12345678, 2**62]
    assert text_keys(pa.array(ints, pa.int64())).to_pylist() == encode_keys(ints)
    strings = ["a", "é", "", "x y"]
    assert text_keys(pa.chunked_array([strings[:2], strings[2:]])).to_pylist() == encode_keys(
        strings
    )


def test_vectorised_crc32_equals_zlib_so_bulk_and_single_reads_agree() -> None:
    keys = text_keys(pa.array(["", "a", "é", "12345678", "a much longer key than most"] * 3))
    assert crc32_many(keys).tolist() == [zlib.crc32(k) for k in keys.to_pylist()]
    sliced = keys.slice(2, 5)  # an Arrow slice has an offset into shared buffers
    assert crc32_many(sliced).tolist() == [zlib.crc32(k) for k in sliced.to_pylist()]


def test_raw_payload_is_exactly_what_redis_py_would_send() -> None:
    keys = text_keys(pa.array(["a", "bb", "a2", "zz"]))
    values = np.array([[1.0, -1.0], [2.0, 0.5], [3.0, 0.0], [4.0, 9.0]], dtype=np.float32)
    buckets = 2
    chunks = redis_hset_payload("ns", 3, buckets, keys, values, chunk_commands=1)
    expected: dict[int, list[bytes]] = {}
    for key, row in zip(keys.to_pylist(), values, strict=True):
        expected.setdefault(zlib.crc32(key) % buckets, []).extend([key, row.tobytes()])
    packer = Connection()
    wanted = sorted(
        b"".join(packer.pack_command("HSET", redis_bucket_key("ns", 3, b), *fields))
        for b, fields in expected.items()
    )
    assert sorted(bytes(payload) for payload, _ in chunks) == wanted
    assert [commands for _, commands in chunks] == [1] * len(expected)


def test_every_multi_key_delete_stays_in_one_cluster_slot() -> None:
    groups = redis_bucket_groups("churn", 12, 3 * BUCKETS_PER_GROUP + 5)
    assert [len(g) for g in groups] == [BUCKETS_PER_GROUP] * 3 + [5]
    assert all(len({key_slot(k) for k in group}) == 1 for group in groups)
    assert len({key_slot(group[0]) for group in groups}) > 1  # a version spreads over slots
    assert key_slot(redis_state_key("churn")) == key_slot(b"churn")


def test_version_one_layout_is_still_readable() -> None:
    assert redis_bucket_key("ns", 2, 5, encoding=1) == b"bs:ns:v2:b5"


def new(run: str) -> NewVersion:
    return NewVersion(
        run_id=run, expected_keys=10, outputs=["p"], model_name="m", model_version="1",
        scored_at="2026-11-23T00:00:00+00:00", key_column="k",
    )  # fmt: skip


def loaded(state: NamespaceState, run: str) -> tuple[NamespaceState, int]:
    state, info = state.begin(new(run))
    return state.complete("ns", info.version, 10), info.version


def test_gc_keeps_live_the_last_n_and_in_flight_exports() -> None:
    state = NamespaceState()
    state, v1 = loaded(state, "r1")
    state, stale = state.begin(new("superseded"))  # began before v2, never finished
    state.versions[stale.version].created_at = "2026-01-01T00:00:00+00:00"  # long ago
    state, v2 = loaded(state, "r2")
    state, v3 = loaded(state, "r3")
    for version in (v1, v2, v3):
        state, _ = state.publish("ns", version, keep=5)
    state, in_flight = state.begin(new("r4"))
    after, doomed = state.gc(keep=2, loading_grace_seconds=3600)
    assert sorted(d.version for d in doomed) == [v1, stale.version]
    assert sorted(after.versions) == [v2, v3, in_flight.version]
    assert after.live == v3 and after.history == [v2, v3]
    assert sorted(after.deleting) == [v1, stale.version]  # until the data is gone
    assert sorted(after.forget([v1, stale.version]).deleting) == []


def test_gc_finishes_an_interrupted_delete() -> None:
    state, v1 = loaded(NamespaceState(), "r1")
    state, v2 = loaded(state, "r2")
    state, _ = state.publish("ns", v1, keep=1)
    state, dropped = state.publish("ns", v2, keep=1)
    assert [d.version for d in dropped] == [v1] and v1 in state.deleting
    _, again = state.gc(keep=1)  # the publisher died before forgetting v1
    assert [d.version for d in again] == [v1]


def test_a_ttl_stamps_each_version_completed_after_it() -> None:
    state, before = loaded(NamespaceState(), "r1")
    state = state.set_ttl(60)
    started = datetime.now(UTC)
    state, after = loaded(state, "r2")
    assert state.versions[before].expires_at is None
    info = state.versions[after]
    assert info.expires_at is not None and not info.expired()
    # at least the whole TTL from its completion: the stamp's second is rounded up, not down
    assert datetime.fromisoformat(info.expires_at) >= started + timedelta(seconds=60)
    assert info.expired(datetime.now(UTC) + timedelta(seconds=61))
    state, _ = state.publish("ns", before, keep=5)
    later = datetime.now(UTC) + timedelta(seconds=61)
    _, doomed = state.gc(keep=5, now=later)
    assert [d.version for d in doomed] == [after]
    assert state.set_ttl(0).ttl_seconds is None


def test_publish_never_mutates_the_state_it_was_given() -> None:
    state, v1 = loaded(NamespaceState(), "r1")
    state, _ = state.publish("ns", v1, keep=1)
    snapshot = state.model_dump()
    state.publish("ns", v1, keep=1)
    with pytest.raises(Exception, match="no version 99"):
        state.publish("ns", 99, keep=1)
    assert state.model_dump() == snapshot
