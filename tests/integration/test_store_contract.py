"""One suite, every store: the embedded LMDB store and a real redis-server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kv_export.encoding import bucket_count, encode_keys, pack_values, unpack_value
from kv_export.errors import BadStoreUrl, StoreUnavailable, VersionIncomplete
from kv_export.store import NewVersion, PredictionStore, open_store
from tests.conftest import RedisServer

KEYS = 5_000


@pytest.fixture(params=["lmdb", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PredictionStore]:
    if request.param == "lmdb":
        opened = open_store(f"lmdb://{tmp_path / 'store'}")
    else:
        server = RedisServer(tmp_path)
        server.start()
        request.addfinalizer(server.stop)
        opened = open_store(server.url)
    yield opened
    opened.close()


def load(store: PredictionStore, run: str, value: float, keys: int = KEYS) -> int:
    new = NewVersion(
        run_id=run, expected_keys=keys, buckets=bucket_count(keys), outputs=["p"],
        model_name="m", model_version=run, scored_at="2026-11-23T00:00:00+00:00", key_column="k",
    )
    info = store.begin_version("ns", new)
    names = encode_keys(range(keys))
    values = pack_values(np.full((keys, 1), value, dtype=np.float32))
    for start in range(0, keys, 1000):
        store.write("ns", info, names[start : start + 1000], values[start : start + 1000])
    return store.complete_version("ns", info.version, keys).version


def live_values(store: PredictionStore, keys: list[bytes]) -> set[float]:
    info = store.state("ns").live_info()
    assert info is not None
    return {unpack_value(v, ["p"])["p"] for v in store.get_many("ns", info, keys) if v}


def test_a_loaded_version_is_invisible_until_published(store: PredictionStore) -> None:
    version = load(store, "r1", 1.0)
    assert store.state("ns").live is None
    store.publish("ns", version, keep=2)
    info = store.state("ns").live_info()
    assert info is not None and info.version == version and info.key_count == KEYS
    got = store.get_many("ns", info, [b"0", b"4999", b"missing"])
    assert [unpack_value(v, ["p"]) if v else None for v in got] == [{"p": 1.0}, {"p": 1.0}, None]
    assert store.namespaces() == ["ns"]


def test_an_incomplete_version_cannot_be_published(store: PredictionStore) -> None:
    new = NewVersion(
        run_id="r", expected_keys=1, outputs=["p"], model_name="m", model_version="1",
        scored_at="t", key_column="k",
    )
    info = store.begin_version("ns", new)
    with pytest.raises(VersionIncomplete):
        store.publish("ns", info.version, keep=2)


def test_rollback_restores_the_previous_version_and_old_data_is_deleted(
    store: PredictionStore,
) -> None:
    v1, v2 = load(store, "r1", 1.0), load(store, "r2", 2.0)
    store.publish("ns", v1, keep=2)
    store.publish("ns", v2, keep=2)
    assert live_values(store, [b"1", b"2"]) == {2.0}
    assert store.rollback("ns").version == v1
    assert live_values(store, [b"1", b"2"]) == {1.0}
    v3, v4 = load(store, "r3", 3.0), load(store, "r4", 4.0)
    store.publish("ns", v3, keep=2)
    store.publish("ns", v4, keep=2)
    old = store.state("ns")
    assert sorted(old.versions) == [v3, v4]
    gone = NewVersion(
        run_id="r1", expected_keys=KEYS, buckets=bucket_count(KEYS), outputs=["p"],
        model_name="m", model_version="1", scored_at="t", key_column="k",
    )
    # The data of a dropped version is gone, not merely unreferenced.
    ghost = store.begin_version("other", gone).model_copy(update={"version": v1})
    assert store.get_many("ns", ghost, [b"1"]) == [None]


def test_readers_never_see_a_mix_while_a_version_is_published(store: PredictionStore) -> None:
    keys = encode_keys(range(0, KEYS, 50))
    store.publish("ns", load(store, "r1", 1.0), keep=3)
    v2 = load(store, "r2", 2.0)
    seen: list[set[float]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(live_values(store, keys))

    reader = threading.Thread(target=read)
    reader.start()
    store.publish("ns", v2, keep=3)
    v3 = load(store, "r3", 3.0)
    store.publish("ns", v3, keep=1)  # drops v1 and v2 while the reader reads
    stop.set()
    reader.join()
    assert seen and all(len(values) == 1 for values in seen)
    assert {next(iter(v)) for v in seen} <= {1.0, 2.0, 3.0}


def test_a_retried_export_reuses_the_run_version(store: PredictionStore) -> None:
    first = load(store, "r1", 1.0)
    assert load(store, "r1", 1.0) == first
    assert len(store.state("ns").versions) == 1


def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(BadStoreUrl, match="memcached.*redis://"):
        open_store("memcached://localhost")


@pytest.mark.redis
def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    store = open_store(server.url.replace("redis://", "redis://:secret@"), timeout_seconds=0.2)
    with pytest.raises(StoreUnavailable) as caught:
        store.state("ns")
    assert f"127.0.0.1:{server.port}" in str(caught.value)
    assert "secret" not in str(caught.value)
