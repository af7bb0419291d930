"""The lookup API's Redis reader against a real redis-server.

A single-key read (``get_one``, the pipeline's future) answers as ``get_many``
does; a failure reaches exactly the lookups it concerns as ``StoreUnavailable``
(a Redis error reply: its own lookup; a hung server: every waiting lookup,
within the timeout; a stopped one: every waiting lookup at once); a lookup that
goes away leaves the others their replies; the next lookup after a failure
connects again.
"""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
import redis

from kv_export.encoding import (
    bucket_of,
    pack_values,
    redis_bucket_key,
)
from kv_export.errors import StoreUnavailable
from kv_export.redis_reader import RedisReader
from kv_export.state import VersionInfo
from kv_export.store import open_store
from tests.conftest import RedisServer, load_version

pytestmark = [pytest.mark.redis]
KEYS = 2000
GUARD_SECONDS = 30  # far longer than any answer takes: reaching it means a lookup hung


def publish(url: str) -> VersionInfo:
    """A live version of the keys '0'..'1999'; key k predicts k / 2."""
    store = open_store(url)
    live = store.publish("ns", load_version(store, "r1", np.arange(KEYS) / 2), keep=2)
    store.close()
    return live


def value(key: int) -> bytes:
    return pack_values(np.array([key / 2]))[0]


def test_one_key_reads_as_a_batch_does(redis_server: RedisServer) -> None:
    info = publish(redis_server.url)

    async def reads() -> None:
        reader = RedisReader(redis_server.url)
        keys = [b"0", b"1234", b"missing"]
        expected = [value(0), value(1234), None]
        assert await reader.get_many("ns", info, keys) == expected
        assert [await reader.get_one("ns", info, k) for k in keys] == expected
        assert [(await reader.get_many("ns", info, [k]))[0] for k in keys] == expected
        every = [b"%d" % k for k in range(KEYS)] + [b"missing"]  # many keys a bucket
        assert len({bucket_of(k, info.buckets) for k in every}) < KEYS / 10
        assert await reader.get_many("ns", info, every) == [value(k) for k in range(KEYS)] + [None]
        expired = info.model_copy(update={"expires_at": "2000-01-01T00:00:00+00:00"})
        assert await reader.get_one("ns", expired, b"0") is None
        await reader.close()

    asyncio.run(reads())


def test_a_redis_error_reply_fails_only_its_own_lookup(redis_server: RedisServer) -> None:
    info = publish(redis_server.url)
    broken = b"5"
    bucket = bucket_of(broken, info.buckets)
    fine = next(k for k in range(KEYS) if bucket_of(b"%d" % k, info.buckets) != bucket)
    client = redis.Redis(port=redis_server.port)
    client.set(redis_bucket_key("ns", info.version, bucket, info.encoding), b"not a hash")

    async def reads() -> list[object]:
        reader = RedisReader(redis_server.url)
        found: list[object] = list(
            await asyncio.gather(
                reader.get_one("ns", info, broken),
                reader.get_one("ns", info, b"%d" % fine),
                reader.get_many("ns", info, [broken, b"%d" % fine]),
                return_exceptions=True,
            )
        )
        found.append(await reader.get_one("ns", info, b"%d" % fine))  # the stream is intact
        await reader.close()
        return found

    one, other, batch, after = asyncio.run(reads())
    assert isinstance(one, StoreUnavailable) and "reading 'ns'" in one.what
    assert isinstance(batch, StoreUnavailable)
    assert other == after == value(fine)


def test_a_cancelled_lookup_leaves_the_others_their_replies(redis_server: RedisServer) -> None:
    info = publish(redis_server.url)

    async def reads() -> None:
        reader = RedisReader(redis_server.url)
        gone = asyncio.ensure_future(reader.get_many("ns", info, [b"1"]))
        stays = asyncio.ensure_future(reader.get_many("ns", info, [b"2"]))
        await asyncio.sleep(0)  # both commands are queued
        gone.cancel()
        assert await stays == [value(2)]
        assert gone.cancelled()
        assert await reader.get_one("ns", info, b"3") == value(3)
        await reader.close()

    asyncio.run(reads())


def test_a_hung_server_fails_every_waiting_lookup_within_the_timeout(
    redis_server: RedisServer,
) -> None:
    info = publish(redis_server.url)
    server = redis_server.process
    assert server is not None

    async def reads() -> None:
        reader = RedisReader(redis_server.url, timeout_seconds=0.3)
        assert await reader.get_one("ns", info, b"1") == value(1)  # connected
        server.send_signal(signal.SIGSTOP)
        try:
            # A stopped server never answers: only the reader's own deadline ends the wait
            # (its exact timing is the unit test's, tests/unit/test_resp_connection.py).
            async with asyncio.timeout(GUARD_SECONDS):
                failed = await asyncio.gather(
                    *(reader.get_one("ns", info, b"%d" % k) for k in range(5)),
                    reader.get_many("ns", info, [b"1", b"2", b"3"]),
                    reader.ping(),
                    return_exceptions=True,
                )
            assert all(isinstance(f, StoreUnavailable) for f in failed), failed
        finally:
            server.send_signal(signal.SIGCONT)
        assert await reader.get_one("ns", info, b"4") == value(4)
        await reader.close()

    asyncio.run(reads())


def test_a_stopped_server_fails_the_waiting_lookups_and_a_restarted_one_is_reconnected(
    redis_server: RedisServer,
) -> None:
    info = publish(redis_server.url)

    async def reads() -> None:
        # A deadline far beyond the guard: a failure within the guard came from the closed
        # connection itself, not from waiting the deadline out.
        reader = RedisReader(redis_server.url, timeout_seconds=10 * GUARD_SECONDS)
        assert await reader.get_one("ns", info, b"7") == value(7)  # connected
        waiting = asyncio.gather(
            *(reader.get_one("ns", info, b"%d" % k) for k in range(50)), return_exceptions=True
        )
        redis_server.stop()  # the connection is closed under the waiting lookups, or before
        async with asyncio.timeout(GUARD_SECONDS):
            failed = [f for f in await waiting if not isinstance(f, bytes)]
            refused = await asyncio.gather(reader.get_one("ns", info, b"1"), return_exceptions=True)
        problems = [*failed, *refused]
        assert all(isinstance(f, StoreUnavailable) for f in problems), problems
        assert "ConnectionRefusedError" in str(refused[0])  # nothing listens: says so
        redis_server.start()  # empty: no persistence in this fixture
        assert await reader.get_one("ns", info, b"7") is None  # read again on a new connection
        assert (await reader.state("ns")).live is None
        await reader.close()

    asyncio.run(reads())


def test_a_reader_serves_one_event_loop_after_another(redis_server: RedisServer) -> None:
    """``asyncio.run`` per call (tests, scripts): a connection made in a loop that has
    ended is dropped, not written to, and the next loop connects again."""
    info = publish(redis_server.url)
    reader = RedisReader(redis_server.url, timeout_seconds=1)

    async def read(key: bytes) -> bytes | None:
        return await asyncio.wait_for(reader.get_one("ns", info, key), 5)

    for key in (b"1", b"2", b"3"):
        assert asyncio.run(read(key)) == value(int(key))
    asyncio.run(reader.close())
