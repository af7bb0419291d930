"""The lookup API's Redis reads: redis-py connections, auto-pipelined.

Why not one ``redis.asyncio`` command per request: on the 2-core benchmark
machine a plain ``await client.hget(...)`` with 32 callers costs about 40 µs of
client CPU per call (connection checkout and release, retry wrapper,
observability hooks, a timer task per write and per read, one ``send`` and one
``recv`` syscall each), more than the whole rest of a lookup, and every call is
also one wake-up of redis-server on the same cores. Here every command issued
during one turn of the event loop (the HGETs of all requests that arrived
together, the HMGETs of a batch, the live pointer refreshes) is packed into one
write on one pooled connection, the replies are read back in order under one
deadline: about 5 µs a command with 32 callers, and 15-18 commands a write
behind the API at 32 connections. The same technique as ioredis'
``enableAutoPipelining``.

Invariants:

- A lookup is still one round trip: its command goes out with the next write
  and its reply is the next one for it on that connection (Redis answers in
  order).
- At most ``max_in_flight`` writes are outstanding, each on its own connection
  of one pool shared by the process; while they all are, new commands queue and
  leave together when one returns, so batches grow with load instead of
  connections.
- Every exchange (checkout, write, every reply) has one deadline,
  ``timeout_seconds``, connecting has ``timeout_seconds`` too, and there are no
  retries: a failure reaches every waiting caller as ``StoreUnavailable`` at
  once (and the connection is dropped), so the breaker and the fallback see it.
  A reply that is a Redis error fails only its own caller.
- A caller that goes away (cancelled request) does not disturb the others: its
  reply is read and dropped.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from kv_export.encoding import bucket_of, redis_bucket_key, redis_state_key
from kv_export.errors import StoreUnavailable
from kv_export.store import NamespaceState, VersionInfo, redact_url

MAX_IN_FLIGHT = 2  # 1, 2 and 4 measured the same req/s under bench-serve; 2 overlaps writes
STATE_PATTERN = b"bs:{*}:state"
HGET_PREFIXES = 16_384  # bucket keys kept: every bucket of a 1M-key version, ~3 MB at most
Command = tuple[bytes, int, str, "asyncio.Future[Any]"]  # RESP, replies expected, doing, result
Unavailable = Callable[[str, BaseException], StoreUnavailable]


def resp(*parts: bytes) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` writes it for bytes arguments."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@lru_cache(maxsize=HGET_PREFIXES)
def hget_prefix(namespace: str, version: int, bucket: int, encoding: int) -> bytes:
    """``HGET <bucket key>`` in RESP without the field, the part of a single-key lookup's
    command that all keys of one bucket share: cached, the command costs 0.3 µs instead of
    0.6 µs of formatting per lookup."""
    name = redis_bucket_key(namespace, version, bucket, encoding)
    return b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n" % (len(name), name)


def _done(result: Any) -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


async def _read(connection: Any) -> Any:
    """The next reply; a Redis error reply is returned, not raised (the stream is intact)."""
    try:
        return await connection.read_response()
    except ResponseError as exc:
        return exc


class AutoPipeline:
    """Commands queued in the same event-loop turn share one write and one connection.

    A command's future fails with ``unavailable(doing, error)`` when its reply is a
    Redis error or its exchange failed with a redis-py or socket error, so a caller can
    await the future itself and needs no coroutine of its own to translate the error.
    """

    def __init__(
        self,
        pool: aioredis.ConnectionPool,
        timeout_seconds: float,
        max_in_flight: int,
        unavailable: Unavailable,
    ) -> None:
        self._pool = pool
        self._timeout = timeout_seconds
        self._max_in_flight = max_in_flight
        self._unavailable = unavailable
        self._queue: list[Command] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, command: bytes, doing: str, replies: int = 0) -> asyncio.Future[Any]:
        """Queue RESP-encoded commands. With ``replies`` 0, ``command`` is one command and
        the future gets its reply; otherwise it is that many commands and the future gets
        the list of their replies (the first Redis error among them fails it). ``doing``
        says what for, in the ``StoreUnavailable`` of a failure."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, replies, doing, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Command]) -> None:
        error: BaseException | None = None
        try:
            await self._exchange(batch)
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): the callers were failed below
        finally:
            self._finish(batch, error)

    async def _exchange(self, batch: list[Command]) -> None:
        connection = None
        try:
            # One deadline for the whole exchange; the connections have no per-read timer.
            async with asyncio.timeout(self._timeout):
                connection = await self._pool.get_connection()
                await connection.send_packed_command(b"".join(c[0] for c in batch), False)
                for _, replies, doing, future in batch:
                    reply: Any
                    if replies:
                        several = [await _read(connection) for _ in range(replies)]
                        errors = [r for r in several if isinstance(r, ResponseError)]
                        reply = errors[0] if errors else several
                    else:  # _read inline: one coroutine fewer for each single-key lookup
                        try:
                            reply = await connection.read_response()
                        except ResponseError as exc:
                            reply = exc
                    if future.done():
                        continue  # the caller went away; its reply is dropped
                    if isinstance(reply, ResponseError):
                        self._fail(future, doing, reply)
                    else:
                        future.set_result(reply)
        except BaseException:
            if connection is not None:
                await connection.disconnect(nowait=True)  # replies may be left unread
            raise
        finally:
            if connection is not None:
                await self._pool.release(connection)

    def _finish(self, batch: list[Command], error: BaseException | None) -> None:
        if error is not None:
            failure = error if isinstance(error, Exception) else RedisError(type(error).__name__)
            for _, _, doing, future in batch:
                if not future.done():
                    self._fail(future, doing, failure)
        self._in_flight -= 1
        if self._queue:
            self._schedule(asyncio.get_running_loop())

    def _fail(self, future: asyncio.Future[Any], doing: str, error: Exception) -> None:
        """A redis-py or socket error becomes ``StoreUnavailable`` (its cause kept), one
        instance per caller; anything else, a bug, reaches the caller as it is."""
        if isinstance(error, (RedisError, OSError)):
            unavailable = self._unavailable(doing, error)
            unavailable.__cause__ = error
            future.set_exception(unavailable)
        else:
            future.set_exception(error)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisReader:
    """``AsyncPredictionReader`` over Redis for the lookup API.

    One HGET per single-key lookup, one HMGET per bucket touched by a batch, one
    GET per live-pointer refresh, all through ``AutoPipeline``; ``namespaces``
    pages with SCAN over state keys only (never data keys). ``password``
    (``BATCHSCORE_STORE_PASSWORD``) is used when the URL carries none.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 0.5,
        password: str | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.url = url
        options: dict[str, Any] = {"password": password} if password else {}
        # URL options win over keyword arguments in redis-py, so a URL password wins.
        self._pool = aioredis.ConnectionPool.from_url(
            url,
            socket_timeout=None,  # AutoPipeline bounds each exchange as a whole
            socket_connect_timeout=timeout_seconds,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_in_flight,
            **options,
        )
        self._pipeline = AutoPipeline(
            self._pool, timeout_seconds, max_in_flight, unavailable=self._unavailable
        )

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"Redis at {redact_url(self.url)} did not answer while {doing}",
            found=type(exc).__name__,
            fix="Check that the server runs and the URL, password and TLS settings are right",
        )

    async def state(self, namespace: str) -> NamespaceState:
        command = resp(b"GET", redis_state_key(namespace))
        raw = await self._pipeline.call(command, "reading the namespace")
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    async def namespaces(self) -> list[str]:
        names: list[str] = []
        cursor = b"0"
        while True:
            command = resp(b"SCAN", cursor, b"MATCH", STATE_PATTERN, b"COUNT", b"1000")
            cursor, keys = await self._pipeline.call(command, "listing namespaces")
            names += (k.decode()[len("bs:{") : -len("}:state")] for k in keys)
            if cursor == b"0":
                return sorted(set(names))

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> Awaitable[bytes | None]:
        """``get_many`` of one key, as the pipeline's future itself rather than a coroutine
        (``lookup.readers.SingleKeyReader``): a single-key lookup then suspends and resumes
        one coroutine layer shallower, which measured about 1 µs a lookup."""
        if info.expires_at is not None and info.expired():
            return _done(None)
        prefix = hget_prefix(namespace, info.version, bucket_of(key, info.buckets), info.encoding)
        command = b"%s$%d\r\n%s\r\n" % (prefix, len(key), key)  # = resp(b"HGET", name, key)
        return self._pipeline.call(command, f"reading '{namespace}'")

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        if len(keys) == 1:
            return [await self.get_one(namespace, info, keys[0])]
        if info.expires_at is not None and info.expired():
            return [None] * len(keys)
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            by_bucket[bucket_of(key, info.buckets)].append(i)
        commands = b"".join(
            resp(
                b"HMGET",
                redis_bucket_key(namespace, info.version, bucket, info.encoding),
                *(keys[i] for i in positions),
            )
            for bucket, positions in by_bucket.items()
        )
        values = await self._pipeline.call(commands, f"reading '{namespace}'", len(by_bucket))
        found: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(by_bucket.values(), values, strict=True):
            for i, value in zip(positions, reply, strict=True):
                found[i] = value
        return found

    async def ping(self) -> None:
        await self._pipeline.call(resp(b"PING"), "checking the connection")

    async def close(self) -> None:
        await self._pipeline.close()
        await self._pool.aclose()
