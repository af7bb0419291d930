"""The lookup API's Redis reads: one pipelined RESP connection per process, parsed by hiredis.

Why not one ``redis.asyncio`` command per request: each such call carries a
connection checkout and release, a retry wrapper, observability hooks, a timer task
per write and per read, and one ``send`` and one ``recv`` syscall, all paid per
lookup, and every call is also one wake-up of redis-server. Here every command issued
during one turn of the event loop (the HGETs of all requests that arrived together,
the HMGETs of a batch, the live pointer refreshes) is packed into one write, the
technique of ioredis' ``enableAutoPipelining``, so the lookups of one turn share one
write, one syscall and one wake-up of redis-server.

And why not redis-py's connections underneath (as this module did until 2026-12):
reading each reply through ``Connection.read_response`` costs two coroutines and a
task a reply, and a pool checkout and a timeout scope a write. Here the replies are
taken from ``hiredis.Reader`` (the C parser redis-py itself uses) as they arrive in
``data_received`` and handed to their waiters in order: no coroutine per reply. The
lookup API's costs per request are in docs/benchmarks.md. redis-py still reads the
URL: ``redis://``, ``rediss://`` (its TLS options and context), ``unix://``, username,
password and database mean what they mean to redis-py, and the exporter and the CLI
use redis-py for everything else.

Invariants:

- A lookup is one round trip: its command goes out with the next write and its
  reply is the next one for it on the connection (Redis answers in order);
  writes do not wait for earlier replies (pipelining), so there is one
  connection per process and batches grow with load.
- Every command has one deadline, ``timeout_seconds`` after its write; a reply
  overdue fails every waiting caller as ``StoreUnavailable`` at once and drops
  the connection (its late replies cannot be matched any more). Connecting
  (TCP, TLS, AUTH, SELECT) has ``timeout_seconds`` too. There are no retries;
  the next command connects again, and the breaker above decides when that is.
- A reply that is a Redis error fails only its own caller.
- A caller that goes away (cancelled request) does not disturb the others: its
  reply is read and dropped.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any, TypeAlias, TypeVar, cast

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kv_export.encoding import bucket_of, redis_bucket_key, redis_state_key
from kv_export.errors import StoreUnavailable
from kv_export.interface import redact_url
from kv_export.state import NamespaceState, VersionInfo

STATE_PATTERN = b"bs:{*}:state"
# A reply as hiredis gives it undecoded: bulk and simple strings as bytes, integers as int,
# nil as None, arrays as lists. An error reply never reaches a caller: it fails its future.
Reply: TypeAlias = "bytes | int | None | list[Reply]"
T = TypeVar("T")
# Bucket commands kept per cache: every bucket of a 1M-key version (ceil(1M / 64) buckets).
HGET_PREFIXES = 16_384
Unavailable = Callable[[str, BaseException], StoreUnavailable]
NOT_YET = object()  # what hiredis gives while a reply is incomplete (no reply can be it)


def resp(*parts: bytes) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` writes it for bytes arguments."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@lru_cache(maxsize=HGET_PREFIXES)
def hget_prefix(namespace: str, version: int, bucket: int, encoding: int) -> bytes:
    """``HGET <bucket key>`` in RESP without the field, the part of a single-key lookup's
    command that all keys of one bucket share: cached, a single-key lookup's command is one
    short format of the key instead of formatting the bucket key again for every lookup."""
    name = redis_bucket_key(namespace, version, bucket, encoding)
    return b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n" % (len(name), name)


@lru_cache(maxsize=HGET_PREFIXES)
def hmget_head(namespace: str, version: int, bucket: int, encoding: int) -> bytes:
    """``HMGET <bucket key>`` in RESP without the array header and the fields: a batch
    touches about one bucket per key, so formatting the bucket key was most of building
    its commands."""
    name = redis_bucket_key(namespace, version, bucket, encoding)
    return b"$5\r\nHMGET\r\n$%d\r\n%s\r\n" % (len(name), name)


def done_future(result: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class Waiter:
    """A caller waiting for ``replies`` replies (0: one reply, given as it is)."""

    __slots__ = ("future", "replies", "doing", "deadline", "collected")

    def __init__(self, future: asyncio.Future[Reply], replies: int, doing: str) -> None:
        self.future = future
        self.replies = replies
        self.doing = doing
        self.deadline = 0.0
        self.collected: list[Reply] = []


def fail(waiter: Waiter, error: BaseException, unavailable: Unavailable) -> None:
    """A Redis error reply, a redis-py or a socket error becomes ``StoreUnavailable`` (its
    cause kept), one instance per caller; anything else, a bug, reaches the caller as it
    is. A caller that went away is left alone."""
    if waiter.future.done():
        return
    if isinstance(error, hiredis.ReplyError):
        error = ResponseError(str(error))
    if isinstance(error, (RedisError, OSError)):
        unavailable_error = unavailable(waiter.doing, error)
        unavailable_error.__cause__ = error
        waiter.future.set_exception(unavailable_error)
    else:
        waiter.future.set_exception(error)


class RespConnection(asyncio.Protocol):
    """One Redis connection: commands written as they come, replies matched in order."""

    def __init__(self, timeout_seconds: float, unavailable: Unavailable) -> None:
        self.loop = asyncio.get_running_loop()  # the transport's; a connection serves no other
        self._timeout = timeout_seconds
        self._unavailable = unavailable
        # Bulk strings as bytes, error replies as ReplyError, NOT_YET for an incomplete reply.
        self._parser = hiredis.Reader(notEnoughData=NOT_YET)
        self._waiting: deque[Waiter] = deque()
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, waiters: list[Waiter]) -> None:
        """Write commands whose replies ``waiters`` wait for, in the same order."""
        assert self._transport is not None and not self.closed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        for waiter in waiters:
            waiter.deadline = deadline
        self._waiting.extend(waiters)
        self._transport.write(data)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        waiting = self._waiting
        try:
            reply = self._parser.gets()
            while reply is not NOT_YET:
                waiter = waiting[0]
                if waiter.replies:
                    waiter.collected.append(reply)
                    if len(waiter.collected) < waiter.replies:
                        reply = self._parser.gets()
                        continue
                    reply = next(
                        (r for r in waiter.collected if isinstance(r, hiredis.ReplyError)),
                        waiter.collected,
                    )
                waiting.popleft()
                if waiter.future.done():
                    pass  # the caller went away; its reply is dropped
                elif isinstance(reply, hiredis.ReplyError):
                    fail(waiter, reply, self._unavailable)
                else:
                    waiter.future.set_result(reply)
                reply = self._parser.gets()
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(RedisConnectionError(f"Unexpected data from Redis: {exc!r}"))

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        oldest = self._waiting[0].deadline
        loop = asyncio.get_running_loop()
        if oldest <= loop.time():
            self.abort(RedisTimeoutError(f"No reply within {self._timeout} s"))
        else:
            self._watchdog = loop.call_at(oldest, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(exc or RedisConnectionError("Connection closed by the server"))

    def forget(self) -> None:
        """Drop a connection of an event loop that is gone (its callers went with it)."""
        self.closed = True
        self._waiting.clear()
        if self._transport is not None and not self.loop.is_closed():
            self._transport.abort()

    def abort(self, error: BaseException) -> None:
        """Fail every waiting caller with ``error`` and drop the connection."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            fail(waiter, error, self._unavailable)
        if self._transport is not None:
            self._transport.abort()


POOL_OPTIONS = ("max_connections", "timeout")  # URL options of redis-py's pools, not used here


def connection_settings(url: str, password: str | None) -> AbstractConnection:
    """redis-py's reading of ``url`` (an unconnected ``Connection`` of the URL's class): host
    and port or socket path, TLS context, username, password, database and client name. A
    password in the URL wins over ``password``, as in redis-py."""
    # redis-py's keyword arguments as its URL parser gives them (TLS options included).
    options: dict[str, Any] = {"password": password} if password else {}
    options |= parse_url(url)
    for name in POOL_OPTIONS:
        options.pop(name, None)
    kind = options.pop("connection_class", Connection)
    return kind(**options)  # type: ignore[no-any-return]


class AutoPipeline:
    """Commands queued in the same event-loop turn share one write on the connection.

    A command's future fails with ``unavailable(doing, error)`` when its reply is a
    Redis error or the connection failed or timed out, so a caller can await the
    future itself and needs no coroutine of its own to translate the error.
    """

    def __init__(
        self, settings: AbstractConnection, timeout_seconds: float, unavailable: Unavailable
    ) -> None:
        self._settings = settings
        self._timeout = timeout_seconds
        self._unavailable = unavailable
        self._connection: RespConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._commands: list[bytes] = []
        self._waiters: list[Waiter] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a flush is due in

    def call(self, command: bytes, doing: str, replies: int = 0) -> asyncio.Future[Reply]:
        """Queue RESP-encoded commands. With ``replies`` 0, ``command`` is one command and
        the future gets its reply; otherwise it is that many commands and the future gets
        the list of their replies (the first Redis error among them fails it). ``doing``
        says what for, in the ``StoreUnavailable`` of a failure."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._commands.append(command)
        self._waiters.append(Waiter(future, replies, doing))
        if self._scheduled is not loop:  # (a flush due in an ended loop never runs)
            self._scheduled = loop
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = None
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not loop:
            if connection is not None and connection.loop is not loop:
                connection.forget()  # made in an earlier event loop (asyncio.run per call)
                self._forget_other_loops(loop)
            self._connection = None
            if self._connecting is None or self._connecting.get_loop() is not loop:
                self._connecting = loop.create_task(self._connect())
            return  # sent once connected
        if self._waiters:
            data, self._commands = b"".join(self._commands), []
            waiters, self._waiters = self._waiters, []
            connection.send(data, waiters)

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                self._connection = await self._open()
        except Exception as exc:  # no caller may be left waiting, whatever went wrong
            # A refused AUTH or SELECT arrives as the StoreUnavailable of its reply.
            cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
            self._fail_queued(cause or exc)
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None
        if self._connection is not None:
            self._flush()

    async def _open(self) -> RespConnection:
        """Connect, authenticate, name the client and select the database, as redis-py's
        ``on_connect`` does."""
        settings = self._settings
        loop = asyncio.get_running_loop()

        def protocol() -> RespConnection:
            return RespConnection(self._timeout, self._unavailable)

        if isinstance(settings, UnixDomainSocketConnection):
            _, connection = await loop.create_unix_connection(protocol, settings.path)
        else:
            assert isinstance(settings, Connection)
            tls = settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
            _, connection = await loop.create_connection(
                protocol, settings.host, settings.port, ssl=tls
            )
        try:
            hello: list[bytes] = []
            if settings.password:
                user = [settings.username.encode()] if settings.username else []
                hello.append(resp(b"AUTH", *user, settings.password.encode()))
            if settings.client_name:
                hello.append(resp(b"CLIENT", b"SETNAME", settings.client_name.encode()))
            if settings.db:
                hello.append(resp(b"SELECT", b"%d" % int(settings.db)))
            if hello:
                future: asyncio.Future[Reply] = loop.create_future()
                connection.send(b"".join(hello), [Waiter(future, len(hello), "connecting")])
                await future
        except BaseException:
            connection.abort(RedisConnectionError("Connection setup failed"))
            raise
        return connection

    def _forget_other_loops(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop queued commands whose callers waited in an event loop that is gone."""
        kept = [i for i, w in enumerate(self._waiters) if w.future.get_loop() is loop]
        self._waiters = [self._waiters[i] for i in kept]
        self._commands = [self._commands[i] for i in kept]

    def _fail_queued(self, error: BaseException) -> None:
        failed, self._waiters, self._commands = self._waiters, [], []
        for waiter in failed:
            fail(waiter, error, self._unavailable)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        closed = RedisConnectionError("The reader was closed")
        self._forget_other_loops(asyncio.get_running_loop())
        self._fail_queued(closed)
        connection, self._connection = self._connection, None
        if connection is not None and connection.loop is asyncio.get_running_loop():
            connection.abort(closed)
        elif connection is not None:
            connection.forget()


def namespace_of(state_key: bytes) -> str | None:
    """The namespace a state key names; None for a name that is not UTF-8 (no request can
    name that namespace, and it must not stop the listing)."""
    try:
        return state_key.decode()[len("bs:{") : -len("}:state")]
    except UnicodeDecodeError:
        return None


class RedisReader:
    """``AsyncPredictionReader`` over Redis for the lookup API.

    One HGET per single-key lookup, one HMGET per bucket touched by a batch, one
    GET per live-pointer refresh, all through ``AutoPipeline``; ``namespaces``
    pages with SCAN over state keys only (never data keys). ``password``
    (``BATCHSCORE_STORE_PASSWORD``) is used when the URL carries none.
    """

    def __init__(
        self, url: str, *, timeout_seconds: float = 0.5, password: str | None = None
    ) -> None:
        self.url = url
        self._pipeline = AutoPipeline(
            connection_settings(url, password), timeout_seconds, unavailable=self._unavailable
        )

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"Redis at {redact_url(self.url)} did not answer while {doing}",
            found=type(exc).__name__,
            fix="Check that the server runs and the URL, password and TLS settings are right",
        )

    async def state(self, namespace: str) -> NamespaceState:
        """The namespace's state; ``ValueError`` (a data error, not the store's failure) when
        the key holds something that is not a state: bad JSON, not UTF-8, not a string."""
        command = resp(b"GET", redis_state_key(namespace))
        try:
            reply = await self._pipeline.call(command, "reading the namespace")
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, ResponseError) and str(exc.__cause__).startswith(
                "WRONGTYPE"
            ):
                raise ValueError(f"the state key of '{namespace}' is not a string") from None
            raise
        raw = cast("bytes | None", reply)  # GET of a string key: a bulk string or nil
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    async def namespaces(self) -> list[str]:
        names: list[str] = []
        cursor = b"0"
        while True:
            command = resp(b"SCAN", cursor, b"MATCH", STATE_PATTERN, b"COUNT", b"1000")
            page = await self._pipeline.call(command, "listing namespaces")
            cursor, keys = cast("tuple[bytes, list[bytes]]", page)  # SCAN: [cursor, [key, ...]]
            names += (name for name in map(namespace_of, keys) if name is not None)
            if cursor == b"0":
                return sorted(set(names))

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> Awaitable[bytes | None]:
        """``get_many`` of one key, as the pipeline's future itself rather than a coroutine
        (``kv_export.interface.SingleKeyReader``): a single-key lookup then awaits the
        future directly, with no coroutine of this reader's to create, suspend and resume."""
        if info.expires_at is not None and info.expired():
            return done_future(None)
        prefix = hget_prefix(namespace, info.version, bucket_of(key, info.buckets), info.encoding)
        command = b"%s$%d\r\n%s\r\n" % (prefix, len(key), key)  # = resp(b"HGET", name, key)
        # HGET: a bulk string or nil (no ``cast``: a function call on every lookup)
        return self._pipeline.call(command, f"reading '{namespace}'")  # type: ignore[return-value]

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
        parts: list[bytes] = []  # = resp(b"HMGET", bucket key, *keys) for every bucket
        for bucket, positions in by_bucket.items():
            head = hmget_head(namespace, info.version, bucket, info.encoding)
            if len(positions) == 1:  # the usual case: a batch's keys spread over buckets
                key = keys[positions[0]]
                parts.append(b"*3\r\n%s$%d\r\n%s\r\n" % (head, len(key), key))
                continue
            parts.append(b"*%d\r\n%s" % (len(positions) + 2, head))
            for i in positions:
                parts.append(b"$%d\r\n%s\r\n" % (len(keys[i]), keys[i]))
        commands = b"".join(parts)
        replies = await self._pipeline.call(commands, f"reading '{namespace}'", len(by_bucket))
        values = cast("list[list[bytes | None]]", replies)  # HMGET: bulk strings or nils
        found: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(by_bucket.values(), values, strict=True):
            for i, value in zip(positions, reply, strict=True):
                found[i] = value
        return found

    async def ping(self) -> None:
        await self._pipeline.call(resp(b"PING"), "checking the connection")

    async def close(self) -> None:
        await self._pipeline.close()
