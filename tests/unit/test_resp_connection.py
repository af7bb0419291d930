"""``RespConnection``: replies matched to their waiters in order, however the bytes arrive.

A fake transport stands in for the socket (unit level); the real redis-server
exchanges are in tests/integration/test_api_redis_reader.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kv_export.errors import StoreUnavailable
from kv_export.redis_reader import RespConnection, Waiter


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True


def unavailable(doing: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"did not answer while {doing}", found=type(exc).__name__)


def connected(timeout: float = 5.0) -> tuple[RespConnection, FakeTransport]:
    connection = RespConnection(timeout, unavailable)
    transport = FakeTransport()
    connection.connection_made(transport)
    return connection, transport


def waiters(*replies: int) -> list[Waiter]:
    loop = asyncio.get_running_loop()
    return [Waiter(loop.create_future(), n, f"call {i}") for i, n in enumerate(replies)]


def results(found: list[Waiter]) -> list[Any]:
    return [
        w.future.exception() or w.future.result() if w.future.done() else "pending" for w in found
    ]


def test_replies_split_anywhere_reach_their_waiters_in_order() -> None:
    async def run() -> None:
        connection, transport = connected()
        calls = waiters(0, 2, 0)
        connection.send(b"three commands", calls)
        assert transport.written == [b"three commands"]
        stream = b"$3\r\none\r\n$3\r\ntwo\r\n$-1\r\n+OK\r\n"
        for i in range(len(stream)):  # one byte at a time: every split point is crossed
            connection.data_received(stream[i : i + 1])
        assert results(calls) == [b"one", [b"two", None], b"OK"]
        assert not transport.aborted

    asyncio.run(run())


def test_an_error_reply_fails_its_own_caller_only_and_a_gone_caller_is_skipped() -> None:
    async def run() -> None:
        connection, _ = connected()
        calls = waiters(0, 0, 2, 0)
        calls[3].future.cancel()  # the client went away; its reply still arrives
        connection.send(b"...", calls)
        connection.data_received(b"-WRONGTYPE bad\r\n$1\r\na\r\n:1\r\n-ERR no\r\n$1\r\nz\r\n")
        first, second, batch, _ = calls
        assert isinstance(first.future.exception(), StoreUnavailable)
        assert "ResponseError" in str(first.future.exception())
        assert second.future.result() == b"a"
        assert isinstance(batch.future.exception(), StoreUnavailable)  # one of its two failed
        assert calls[3].future.cancelled()

    asyncio.run(run())


def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    async def run() -> None:
        connection, transport = connected()
        connection.data_received(b"+surprise\r\n")
        assert transport.aborted and connection.closed

    asyncio.run(run())


def test_garbage_fails_every_waiting_caller() -> None:
    async def run() -> None:
        connection, transport = connected()
        calls = waiters(0, 0)
        connection.send(b"...", calls)
        connection.data_received(b"?not resp\r\n")
        assert transport.aborted and connection.closed
        assert all(isinstance(e, StoreUnavailable) for e in results(calls))

    asyncio.run(run())


class ManualClock(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it: a deadline is reached
    exactly when the test says, however slow or busy the machine is."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


async def advance(seconds: float) -> None:
    """Move the clock on and let the loop run every timer now due."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, ManualClock)
    loop.now += seconds
    for _ in range(3):  # this task's turn, then the timers' turn
        await asyncio.sleep(0)


def test_an_overdue_reply_fails_every_waiting_caller_at_its_deadline() -> None:
    async def run() -> None:
        connection, transport = connected(timeout=0.2)
        early = waiters(0)
        connection.send(b"a", early)  # due at 0.2
        connection.data_received(b"$1\r\na\r\n")  # answered: the watchdog finds nothing overdue
        await advance(0.1)
        late = waiters(0, 0)
        connection.send(b"b", late)  # due at 0.3
        await advance(0.15)  # 0.25: the first deadline has passed, the second not yet
        assert not transport.aborted
        assert results(late) == ["pending", "pending"]
        await advance(0.1)  # 0.35: the second has passed
        assert transport.aborted and connection.closed
        assert results(early) == [b"a"]
        assert all(isinstance(e, StoreUnavailable) for e in results(late))
        assert "TimeoutError" in str(late[0].future.exception())

    with asyncio.Runner(loop_factory=ManualClock) as runner:
        runner.run(run())


def test_a_lost_connection_fails_every_waiting_caller() -> None:
    async def run() -> None:
        connection, _ = connected()
        calls = waiters(0, 3)
        connection.send(b"...", calls)
        connection.data_received(b"$1\r\na\r\n$1\r\nb\r\n")  # the batch has one of three
        connection.connection_lost(None)
        assert results(calls)[0] == b"a"
        assert isinstance(results(calls)[1], StoreUnavailable)
        assert connection.closed

    asyncio.run(run())
