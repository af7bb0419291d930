"""``LiveCache``: unknown namespaces never push live ones out of the cache."""

from __future__ import annotations

import asyncio
import time

from kv_export.errors import StoreUnavailable
from kv_export.store import NamespaceState, VersionInfo
from lookup.live import LiveCache


def live_state() -> NamespaceState:
    info = VersionInfo(
        version=1,
        run_id="r1",
        state="complete",
        outputs=["p"],
        model_name="m",
        model_version="1",
        scored_at="2026-12-06T00:00:00+00:00",
        key_column="k",
    )
    return NamespaceState(seq=1, live=1, history=[1], versions={1: info})


def test_probing_random_namespaces_never_evicts_a_live_one() -> None:
    store = {"churn": live_state(), "fraud": live_state()}
    down = False

    async def read(namespace: str) -> NamespaceState:
        if down:
            raise StoreUnavailable("store down for the test")
        return store.get(namespace, NamespaceState())

    async def scenario() -> None:
        nonlocal down
        cache = LiveCache(read, ttl=3600, max_namespaces=100)
        for name in store:
            assert (await cache.state(name)).live == 1
        for i in range(10_000):  # a prober's random names: each read once, found empty
            assert (await cache.state(f"probe-{i}")).live is None
        down = True  # an outage: the live namespaces must still be known
        for name in store:
            assert cache.current(name) is not None
            assert (await cache.state(name)).live == 1
        assert set(cache.cached()) == set(store)  # the live ones, not the probes

    asyncio.run(scenario())


def test_unknown_namespaces_are_cached_within_their_own_bound() -> None:
    reads: list[str] = []

    async def read(namespace: str) -> NamespaceState:
        reads.append(namespace)
        return NamespaceState()

    async def scenario() -> None:
        cache = LiveCache(read, ttl=3600, max_namespaces=10)
        await cache.state("nope")
        await cache.state("nope")
        assert reads == ["nope"]  # a repeated probe costs no store read
        for i in range(50):
            await cache.state(f"probe-{i}")
        await cache.state("nope")  # forgotten: bounded, read again
        assert reads.count("nope") == 2

    asyncio.run(scenario())


def test_fresh_waits_out_a_read_started_before_and_shares_one_read_after() -> None:
    reads: list[int] = []
    first_read_may_end = asyncio.Event()

    async def read(namespace: str) -> NamespaceState:
        reads.append(len(reads) + 1)
        number = len(reads)
        if number == 1:
            await first_read_may_end.wait()  # a refresh in flight from before the miss
        state = live_state()
        state.live = number
        return state

    async def scenario() -> None:
        cache = LiveCache(read, ttl=3600)
        older = cache._refresh("ns")
        await asyncio.sleep(0.01)
        since = time.monotonic()
        waiting = [asyncio.ensure_future(cache.fresh("ns", since)) for _ in range(3)]
        await asyncio.sleep(0.01)
        first_read_may_end.set()
        assert (await older).live == 1
        assert [(await w).live for w in waiting] == [2, 2, 2]  # read after `since`, once
        assert reads == [1, 2]
        assert (await cache.fresh("ns", since)).live == 2  # already fresh enough: no read
        assert reads == [1, 2]

    asyncio.run(scenario())
