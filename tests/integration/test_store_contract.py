"""One suite, every store: the embedded LMDB store, a real redis-server and a real Redis
Cluster (three primaries, three replicas)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kv_export.encoding import encode_keys, text_keys, unpack_value
from kv_export.errors import (
    BadCanaryPercent,
    BadStoreUrl,
    CanaryRefused,
    StoreUnavailable,
    VersionIncomplete,
)
from kv_export.interface import PredictionStore
from kv_export.store import open_store
from tests.conftest import (
    RedisClusterServers,
    RedisServer,
    load_version,
    new_version,
    wait_past,
)

KEYS = 5_000


@pytest.fixture(
    params=[
        "lmdb",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PredictionStore]:
    if request.param == "lmdb":
        opened = open_store(f"lmdb://{tmp_path / 'store'}")
    elif request.param == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        opened = open_store(cluster.url)
    else:
        server = RedisServer(tmp_path)
        server.start()
        request.addfinalizer(server.stop)
        opened = open_store(server.url)
    yield opened
    opened.close()


def load(store: PredictionStore, run: str, value: float, keys: int = KEYS) -> int:
    return load_version(store, run, np.full((keys, 1), value, dtype=np.float32))


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
    info = store.begin_version("ns", new_version("r", 1))
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
    # The data of a dropped version is gone, not merely unreferenced.
    ghost = store.begin_version("other", new_version("r1", KEYS)).model_copy(update={"version": v1})
    assert store.get_many("ns", ghost, [b"1"]) == [None]


def live_answer(store: PredictionStore, keys: list[bytes]) -> list[float | None]:
    """What a reader gets: the live version's value of each key (None: not found)."""
    info = store.state("ns").live_info()
    assert info is not None
    return [unpack_value(v, ["p"])["p"] if v else None for v in store.get_many("ns", info, keys)]


def wait_until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {within} s waiting for {what}"
        time.sleep(0.001)


def test_every_read_during_a_publish_is_all_old_or_all_new(store: PredictionStore) -> None:
    """A reader reading while a version is published gets, in every answer, every key of
    the old version or every key of the new one: never a mix, never a gap; and once it has
    seen the new version it never sees the old one again. (Deleting versions while readers
    read is the garbage-collection test below.)"""
    keys = encode_keys(range(0, KEYS, 50))
    store.publish("ns", load(store, "r1", 1.0), keep=3)
    v2 = load(store, "r2", 2.0)
    answers: list[list[float | None]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                answers.append(live_answer(store, keys))
            except BaseException as exc:  # noqa: BLE001 - any error is a failure
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: len(answers) > 0 or bool(errors), "a read of the old version")
        store.publish("ns", v2, keep=3)
        wait_until(
            lambda: bool(errors) or (answers[-1] == [2.0] * len(keys)), "a read of the new one"
        )
    finally:
        stop.set()
        reader.join()
    assert errors == []
    mixed = [answer for answer in answers if set(answer) not in ({1.0}, {2.0})]
    assert mixed == []  # a None is a gap, two values a mix
    seen = [value for answer in answers if (value := answer[0]) is not None]
    assert seen[0] == 1.0 and seen[-1] == 2.0
    assert seen == sorted(seen)  # the old version, then the new one, never back


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


def bulk_load(store: PredictionStore, run: str, value: float, keys: int = KEYS) -> int:
    """The bulk path the export step uses: Arrow keys and a float32 matrix per write."""
    info = store.begin_version("ns", new_version(run, keys, outputs=("p", "q")))
    names = text_keys(pa.array(np.arange(keys, dtype=np.int64)))
    matrix = np.column_stack([np.full(keys, value), np.arange(keys)]).astype(np.float32)
    for start in range(0, keys, 1500):
        store.write_columns("ns", info, names.slice(start, 1500), matrix[start : start + 1500])
    return store.complete_version("ns", info.version, keys).version


def test_bulk_writes_read_back_key_by_key(store: PredictionStore) -> None:
    store.publish("ns", bulk_load(store, "r1", 0.5), keep=2)
    info = store.state("ns").live_info()
    assert info is not None
    got = store.get_many("ns", info, [b"0", b"4321", b"4999", b"5000"])
    decoded = [unpack_value(v, ["p", "q"]) if v else None for v in got]
    assert decoded == [{"p": 0.5, "q": 0.0}, {"p": 0.5, "q": 4321.0}, {"p": 0.5, "q": 4999.0}, None]
    first = got[0]
    assert first is not None
    assert store.get_many("ns", info, [b"17"]) == [first[:4] + np.float32(17).tobytes()]


def test_gc_deletes_beyond_keep_and_stale_versions_but_not_live_or_in_flight(
    store: PredictionStore,
) -> None:
    v1 = load(store, "r1", 1.0)
    stale = load(store, "never-published", 9.0)
    v2, v3 = load(store, "r2", 2.0), load(store, "r3", 3.0)
    for version in (v1, v2, v3):
        store.publish("ns", version, keep=5)
    in_flight = store.begin_version("ns", new_version("r4", 1))
    deleted = store.gc("ns", keep=2)
    assert sorted(info.version for info in deleted) == [v1, stale]
    state = store.state("ns")
    assert sorted(state.versions) == [v2, v3, in_flight.version] and state.deleting == {}
    assert live_values(store, [b"1", b"2"]) == {3.0}
    for gone in (v1, stale):
        ghost = state.versions[v2].model_copy(update={"version": gone})
        assert store.get_many("ns", ghost, [b"1", b"4999"]) == [None, None]
    assert store.gc("ns", keep=2) == []


def test_an_expired_version_answers_nothing_and_gc_removes_it(store: PredictionStore) -> None:
    store.publish("ns", load(store, "r1", 1.0), keep=5)
    store.set_ttl("ns", 1)
    v2 = load(store, "r2", 2.0)
    store.publish("ns", v2, keep=5)
    assert live_values(store, [b"1"]) == {2.0}
    info = store.state("ns").live_info()
    assert info is not None and info.expires_at is not None
    wait_past(info.expires_at)  # what follows asserts behaviour, not a duration
    assert info.expired()
    assert store.get_many("ns", info, [b"1", b"2"]) == [None, None]
    assert store.rollback("ns").version != v2
    assert [info.version for info in store.gc("ns", keep=5)] == [v2]
    assert live_values(store, [b"1"]) == {1.0}  # versions loaded before the TTL never expire


def test_readers_never_see_a_mix_or_an_error_during_garbage_collection(
    store: PredictionStore,
) -> None:
    keys = encode_keys(range(0, KEYS, 50))
    versions = [load(store, f"r{i}", float(i)) for i in range(1, 5)]
    errors: list[BaseException] = []
    seen: list[set[float]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(live_values(store, keys))
            except BaseException as exc:  # noqa: BLE001 - any error is a failure
                errors.append(exc)

    store.publish("ns", versions[0], keep=10)
    reader = threading.Thread(target=read)
    reader.start()
    for version in versions[1:]:
        store.publish("ns", version, keep=10)
        store.gc("ns", keep=2)  # deletes the version live two publishes ago
    stop.set()
    reader.join()
    assert errors == []
    # Never two versions in one answer. (A reader still holding a state from before two
    # publishes would find its version deleted and get no values, never wrong ones.)
    assert seen and all(len(values) <= 1 for values in seen)
    assert {value for values in seen for value in values} <= {1.0, 2.0, 3.0, 4.0}
    assert sorted(store.state("ns").versions) == versions[-2:]


def routed_answer(store: PredictionStore, keys: list[bytes]) -> tuple[float | None, list[bool]]:
    """What a reader gets during a canary: the state read once, each key read from the
    version the rule gives it; returns the canary's share in that state (None: no canary)
    and, per key, whether the value came from the version the rule picked (the values
    are the version numbers, so a value from any other version, or a gap, is False)."""
    state = store.state("ns")
    by_version: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        info, _ = state.version_for(key)
        assert info is not None
        by_version.setdefault(info.version, []).append(i)
    right = [False] * len(keys)
    for version, where in by_version.items():
        values = store.get_many("ns", state.versions[version], [keys[i] for i in where])
        for i, value in zip(where, values, strict=True):
            right[i] = value is not None and unpack_value(value, ["p"])["p"] == float(version)
    return (state.canary.percent if state.canary else None), right


def canary_load(store: PredictionStore, run: str) -> int:
    """A version whose every value is its own number, so an answer names its version."""
    version = store.state("ns").seq + 1
    assert load(store, run, float(version)) == version
    return version


def test_a_canary_answers_its_share_of_keys_until_promoted_or_aborted(
    store: PredictionStore,
) -> None:
    keys = encode_keys(range(0, KEYS, 7))
    a = canary_load(store, "a")
    store.publish("ns", a, keep=3)
    b = canary_load(store, "b")
    state = store.start_canary("ns", b, 10)
    assert state.live == a and state.canary is not None and store.state("ns") == state
    share, right = routed_answer(store, keys)
    assert share == 10 and all(right)
    canary_keys = [k for k in keys if state.version_for(k)[1]]
    assert 0.05 < len(canary_keys) / len(keys) < 0.15
    assert store.set_canary_percent("ns", 50).canary.percent == 50  # type: ignore[union-attr]
    assert store.abort_canary("ns").canary is None
    assert live_values(store, keys) == {float(a)} and b in store.state("ns").versions
    store.start_canary("ns", b, 20)
    assert store.promote_canary("ns", keep=3).version == b
    state = store.state("ns")
    assert state.canary is None and state.live == b and state.history == [a, b]
    assert live_values(store, keys) == {float(b)}


def test_bad_canary_changes_leave_the_state_as_it_was(store: PredictionStore) -> None:
    first = canary_load(store, "a")
    with pytest.raises(CanaryRefused, match="no live version"):
        store.start_canary("ns", first, 10)
    store.publish("ns", first, keep=3)
    b, c = canary_load(store, "b"), canary_load(store, "c")
    before = store.state("ns")
    for change in (
        lambda: store.promote_canary("ns", keep=3),
        lambda: store.abort_canary("ns"),
        lambda: store.set_canary_percent("ns", 20),
    ):
        with pytest.raises(CanaryRefused, match="no canary running"):
            change()
    for percent in (0, 100, 250):
        with pytest.raises(BadCanaryPercent):
            store.start_canary("ns", b, percent)
    assert store.state("ns") == before
    running = store.start_canary("ns", b, 10)
    with pytest.raises(CanaryRefused, match="canary running"):
        store.start_canary("ns", c, 10)
    with pytest.raises(CanaryRefused, match="canary running"):
        store.publish("ns", c, keep=3)
    with pytest.raises(BadCanaryPercent):
        store.set_canary_percent("ns", 0)
    assert store.state("ns") == running
    assert store.gc("ns", keep=1) == [] and store.state("ns").canary == running.canary


def test_readers_during_canary_changes_get_every_key_from_the_version_the_rule_gives(
    store: PredictionStore,
) -> None:
    """Readers reading while a canary starts, ramps, is aborted, starts again and is
    promoted: every key of every answer comes from the version the rule picks in the state
    that reader read (never a gap, never a third version), and every state seen is one the
    changes wrote."""
    keys = encode_keys(range(0, KEYS, 13))
    a = canary_load(store, "a")
    store.publish("ns", a, keep=3)
    b = canary_load(store, "b")
    shares: list[float | None] = []
    wrong: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                share, right = routed_answer(store, keys)
            except BaseException as exc:  # noqa: BLE001 - any error is a failure
                errors.append(exc)
                return
            shares.append(share)
            wrong.append(right.count(False))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()

    def settle() -> None:
        count = len(shares)
        wait_until(lambda: len(shares) > count + 2 or bool(errors), "reads after a change")

    try:
        for change in (
            lambda: store.start_canary("ns", b, 10),
            lambda: store.set_canary_percent("ns", 50),
            lambda: store.abort_canary("ns"),
            lambda: store.start_canary("ns", b, 5),
            lambda: store.promote_canary("ns", keep=3),
        ):
            change()
            settle()
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert errors == []
    assert set(wrong) == {0}
    assert set(shares) == {None, 10, 50, 5}
    assert store.state("ns").live == b
