"""The store and the lookup reader on a real Redis Cluster (three primaries, three replicas).

The contract suite runs on the cluster too (test_store_contract.py); here: a version
spread over every primary, the exporter and the reader while slots move (MOVED, and
ASK in the middle of a migration), a store URL with a password, the launcher itself.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from redis.crc import key_slot

from kv_export import redis_cluster_reader as cluster_reader
from kv_export.encoding import (
    bucket_of,
    encode_keys,
    pack_values,
    redis_bucket_key,
    text_keys,
)
from kv_export.errors import StoreAuthFailed, StoreUnavailable
from kv_export.redis_cluster import RedisClusterStore
from kv_export.redis_cluster_reader import RedisClusterReader, redirection
from kv_export.state import VersionInfo
from kv_export.store import open_store
from tests.conftest import RedisClusterServers, RedisServer, new_version

pytestmark = pytest.mark.redis
KEYS = 200_000  # 3,125 buckets in 4 groups: four slots, on more than one primary


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of the test's own, for tests that move slots or kill nodes."""
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    yield cluster
    cluster.stop()


def values_of(keys: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(keys, dtype=np.float32) / 4 + offset).reshape(-1, 1)


def bulk_version(store: RedisClusterStore, run: str, offset: float = 0.0) -> VersionInfo:
    """A complete version of "ns" loaded through the raw bulk path; key k predicts k/4."""
    info = store.begin_version("ns", new_version(run, KEYS))
    keys = text_keys(pa.array(np.arange(KEYS)))
    store.write_columns("ns", info, keys, values_of(KEYS, offset))
    return store.complete_version("ns", info.version, KEYS)


def expected(keys: list[int], offset: float = 0.0) -> list[bytes]:
    return pack_values(values_of(KEYS, offset)[keys])


SAMPLE = [0, 1, 77, 4_096, 65_535, 123_457, KEYS - 1]


def group_slots(info: VersionInfo) -> set[int]:
    return {
        key_slot(redis_bucket_key("ns", info.version, b, info.encoding))
        for b in range(0, info.buckets, 1024)
    }


def test_a_version_spreads_over_the_primaries_and_reads_back(
    redis_cluster: RedisClusterServers,
) -> None:
    store = open_store(redis_cluster.url)
    assert isinstance(store, RedisClusterStore)
    info = store.publish("ns", bulk_version(store, "r1").version, keep=2)
    owners = {redis_cluster.port_of_slot(s) for s in group_slots(info)}
    assert len(owners) >= 2, "the test's version should span primaries"
    for port in owners:
        with redis_cluster.node(port).client() as client:
            assert client.dbsize() > 0
    keys = encode_keys(SAMPLE) + [b"missing"]
    assert store.get_many("ns", info, keys) == [*expected(SAMPLE), None]
    assert store.namespaces() == ["ns"]

    async def reads() -> None:
        reader = RedisClusterReader(redis_cluster.url)
        assert (await reader.state("ns")).live == info.version
        assert [await reader.get_one("ns", info, k) for k in keys] == [*expected(SAMPLE), None]
        assert await reader.get_many("ns", info, keys) == [*expected(SAMPLE), None]
        every = encode_keys(range(0, KEYS, 7))
        assert await reader.get_many("ns", info, every) == expected(list(range(0, KEYS, 7)))
        assert await reader.namespaces() == ["ns"]
        await reader.ping()
        await reader.close()

    asyncio.run(reads())
    store.close()


def test_the_exporter_and_the_reader_follow_a_slot_that_moved_or_is_moving(
    own_cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MOVED: a slot given to another primary after the clients read the map; ASK: a slot
    half migrated (some keys on the target). Loads and lookups land where the key is."""
    followed: Counter[str] = Counter()  # the redirections the reader met, by kind

    def counted(error: BaseException | None) -> tuple[bool, int, str, int] | None:
        found = redirection(error)
        if found is not None:
            followed["ASK" if found[0] else "MOVED"] += 1
        return found

    monkeypatch.setattr(cluster_reader, "redirection", counted)
    store = open_store(own_cluster.url)
    assert isinstance(store, RedisClusterStore)
    first = store.publish("ns", bulk_version(store, "r1").version, keep=3)
    reader = RedisClusterReader(own_cluster.url)
    key = b"123457"
    bucket_key = redis_bucket_key(
        "ns", first.version, bucket_of(key, first.buckets), first.encoding
    )
    slot = key_slot(bucket_key)

    async def read(info: VersionInfo, keys: list[bytes]) -> list[bytes | None]:
        return [await reader.get_one("ns", info, k) for k in keys]

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(read(first, [key])) == expected([123_457])  # map read
        source = own_cluster.port_of_slot(slot)
        target = next(p.port for p in own_cluster.primaries() if p.port != source)
        # ASK: the bucket key of the lookup is on the target, the slot still the source's.
        own_cluster.begin_slot_move(slot, target)
        own_cluster.migrate_keys(slot, target, [bucket_key])
        assert loop.run_until_complete(read(first, [key])) == expected([123_457])
        every_third = list(range(0, KEYS, 3))
        batch = encode_keys([*every_third, 123_457])
        got = loop.run_until_complete(reader.get_many("ns", first, batch))
        assert got == expected([*every_third, 123_457])
        assert followed["ASK"] >= 2 and followed["MOVED"] == 0, followed
        # A load during the migration: new keys of the slot go to the target (ASK).
        second = bulk_version(store, "r2", offset=1.0)
        own_cluster.finish_slot_move(slot, target)
        # MOVED: both clients still hold the old map; a batch first, then a single key.
        got = loop.run_until_complete(reader.get_many("ns", first, batch))
        assert got == expected([*every_third, 123_457])
        assert loop.run_until_complete(read(first, [key])) == expected([123_457])
        assert followed["MOVED"] >= 1, followed
        assert loop.run_until_complete(read(second, encode_keys(SAMPLE))) == expected(SAMPLE, 1.0)
        third = bulk_version(store, "r3", offset=2.0)
        got = loop.run_until_complete(reader.get_many("ns", third, encode_keys(range(KEYS))))
        assert got == expected(list(range(KEYS)), 2.0)
        assert store.publish("ns", third.version, keep=3).version == third.version
        assert loop.run_until_complete(reader.state("ns")).live == third.version
        loop.run_until_complete(reader.close())
    finally:
        loop.close()
    store.close()


def test_publishes_and_the_deletion_of_old_versions_on_every_primary(
    redis_cluster: RedisClusterServers,
) -> None:
    """A publish is one WATCH/MULTI on the state key; the versions it lets go are
    deleted by one UNLINK per bucket group (one slot each), on whichever primary."""
    store = open_store(redis_cluster.url)
    assert isinstance(store, RedisClusterStore)
    versions = [bulk_version(store, f"r{i}", offset=float(i)) for i in range(3)]
    for version in versions:
        store.publish("ns", version.version, keep=2)
    state = store.state("ns")
    assert state.live == versions[2].version
    assert sorted(state.versions) == [versions[1].version, versions[2].version]
    gone = versions[0]
    names = [redis_bucket_key("ns", gone.version, b) for b in range(gone.buckets)]
    for port in {redis_cluster.port_of_slot(s) for s in group_slots(gone)}:
        with redis_cluster.node(port).client() as client:
            mine = [n for n in names if redis_cluster.port_of_slot(key_slot(n)) == port]
            assert mine and not any(client.exists(n) for n in mine)
    assert store.get_many("ns", versions[2], encode_keys(SAMPLE)) == expected(SAMPLE, 2.0)
    store.close()


def test_a_password_from_the_url_or_the_setting(tmp_path: Path) -> None:
    cluster = RedisClusterServers(tmp_path / "cluster", password="s3cret pw")
    cluster.start()
    try:
        seeds = cluster.url.removeprefix("redis+cluster://")
        with_password = f"redis+cluster://:s3cret%20pw@{seeds}"
        store = open_store(with_password)
        store.publish("ns", bulk_version(store, "r1").version, keep=2)  # type: ignore[arg-type]
        store.close()
        from_setting = open_store(cluster.url, password="s3cret pw")
        assert from_setting.state("ns").live is not None
        from_setting.close()
        with pytest.raises(StoreAuthFailed) as refused:
            open_store(cluster.url, password="wrong").state("ns")
        assert "wrong" not in str(refused.value)

        async def reads() -> None:
            reader = RedisClusterReader(cluster.url, password="s3cret pw")
            info = (await reader.state("ns")).live_info()
            assert info is not None
            assert await reader.get_one("ns", info, b"8") == expected([8])[0]
            await reader.close()
            anonymous = RedisClusterReader(cluster.url)
            with pytest.raises(StoreUnavailable):
                await anonymous.state("ns")
            await anonymous.close()

        asyncio.run(reads())
    finally:
        cluster.stop()


def test_the_launcher_promotes_a_replica_of_a_killed_primary(
    own_cluster: RedisClusterServers,
) -> None:
    primaries = own_cluster.primaries()
    assert len(primaries) == 3 and all(p.slots > 0 for p in primaries)
    replicas = [n for n in own_cluster.cluster_nodes() if not n.primary]
    assert len(replicas) == 3
    killed = own_cluster.kill_primary()
    now = own_cluster.primaries()
    assert killed not in {p.port for p in now} and len(now) == 3
    assert sum(p.slots for p in now) == 16_384


def test_tls_with_rediss_cluster_and_a_private_ca(tmp_path: Path) -> None:
    """TLS everywhere (clients, cluster bus, replication): the store and the reader read
    the URL's ``ssl_ca_certs`` for every node they find; plain text is refused."""
    from tests.integration.test_redis_failures import make_certificate

    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run `make system-deps`, which installs it")
    cluster = RedisClusterServers(tmp_path / "cluster", tls=make_certificate(tmp_path))
    cluster.start()
    try:
        assert cluster.url.startswith("rediss+cluster://")
        store = open_store(cluster.url)
        info = store.publish("ns", bulk_version(store, "r1").version, keep=2)  # type: ignore[arg-type]
        assert store.get_many("ns", info, encode_keys(SAMPLE)) == expected(SAMPLE)
        store.close()

        async def reads() -> None:
            reader = RedisClusterReader(cluster.url)
            assert await reader.get_many("ns", info, encode_keys(SAMPLE)) == expected(SAMPLE)
            await reader.close()

        asyncio.run(reads())
        plain = cluster.url.replace("rediss+cluster", "redis+cluster").split("/?")[0] + "/"
        with pytest.raises(StoreUnavailable):
            open_store(plain, timeout_seconds=1).state("ns")
    finally:
        cluster.stop()


def test_a_cluster_url_naming_a_plain_server_says_so(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    url = f"redis+cluster://127.0.0.1:{server.port}/"
    try:
        with pytest.raises(StoreUnavailable) as refused:
            open_store(url)
        assert "Cluster mode is not enabled" in str(refused.value)

        async def read() -> None:
            reader = RedisClusterReader(url)
            with pytest.raises(StoreUnavailable) as unread:
                await reader.state("ns")
            assert "cluster support disabled" in str(unread.value)
            await reader.close()

        asyncio.run(read())
    finally:
        server.stop()
