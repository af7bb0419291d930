"""The lookup API's reads from a Redis Cluster: the pipelined RESP reader, routed by slot.

Each primary gets the single-server reader's ``AutoPipeline`` (one connection, the
commands of an event-loop turn in one write, replies parsed by hiredis), and a slot map
read with ``CLUSTER SLOTS`` says which pipeline a key's command goes to. The key's slot
is that of its bucket key's hash tag (``{<ns>:v<n>:g<group>}``), computed once per
bucket and cached like the bucket's command prefix, so a single-key lookup stays one
command to one node and one round trip.

Why not redis-py's ``redis.asyncio.RedisCluster``: it is redis-py's per-command
connection machinery again (a connection checkout, a retry wrapper, coroutines per
reply), which ``kv_export.redis_reader`` replaced for the single server; the benchmark
that decided it is in docs/benchmarks.md.

The cluster changing under the reader:

- MOVED (a slot now lives elsewhere): the command is sent again to the node named,
  that slot is remapped at once and the whole map is read again in the background.
- ASK (a slot being migrated, this key already moved): the command is sent again to
  the node named, preceded by ``ASKING``; the map is not changed.
- A node that does not answer (killed, or the cluster down while a replica takes
  over): the lookup fails with ``StoreUnavailable`` at once, as on a single server
  (the API's breaker and batch fallback take over), and the map is read again from
  any node that answers, so the promoted replica is used from the next lookup on.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from functools import lru_cache
from typing import cast

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kv_export.encoding import bucket_of, redis_bucket_key, redis_state_key
from kv_export.errors import StoreUnavailable
from kv_export.interface import redact_url
from kv_export.redis_cluster_url import cluster_address
from kv_export.redis_reader import (
    HGET_PREFIXES,
    STATE_PATTERN,
    AutoPipeline,
    Reply,
    connection_settings,
    done_future,
    hget_prefix,
    hmget_head,
    namespace_of,
    resp,
)
from kv_export.state import NamespaceState, VersionInfo

SLOTS = 16_384
MAX_REDIRECTS = 5  # a key moved more often than this during one lookup: give up on it
REFRESH_SECONDS = 0.1  # the slot map is read again at most this often after a failure
ASKING = resp(b"ASKING")
CLUSTER_SLOTS = resp(b"CLUSTER", b"SLOTS")


@lru_cache(maxsize=HGET_PREFIXES)
def bucket_slot(namespace: str, version: int, bucket: int, encoding: int) -> int:
    """The cluster slot of a bucket's key (its hash tag's), cached as its command is."""
    return int(key_slot(redis_bucket_key(namespace, version, bucket, encoding)))


def redirection(error: BaseException | None) -> tuple[bool, int, str, int] | None:
    """``(asking, slot, host, port)`` of a MOVED or ASK error reply, else None."""
    if not isinstance(error, ResponseError):
        return None
    kind, _, rest = str(error).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, address = rest.partition(" ")
    host, _, port = address.rpartition(":")
    return kind == "ASK", int(slot), host, int(port)


def node_lost(error: BaseException | None) -> bool:
    """A failure that may mean the slot map changed: no answer, or the cluster down."""
    if isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError)):
        return True
    return isinstance(error, ResponseError) and str(error).startswith(("CLUSTERDOWN", "MASTERDOWN"))


class RedisClusterReader:
    """``AsyncPredictionReader`` over a Redis Cluster for the lookup API (see the module).

    The same commands as ``RedisReader`` (HGET, HMGETs grouped per node, GET of the
    state, SCAN on every primary), each sent to the primary that owns its slot.
    ``password`` (``BATCHSCORE_STORE_PASSWORD``) is used when the URL carries none.
    """

    def __init__(
        self, url: str, *, timeout_seconds: float = 0.5, password: str | None = None
    ) -> None:
        self.url = url
        self._address = cluster_address(url)
        self._password = password
        self._timeout = timeout_seconds
        self._pipelines: dict[tuple[str, int], AutoPipeline] = {}
        self._owner: list[AutoPipeline | None] = [None] * SLOTS
        self._refreshing: asyncio.Task[bool] | None = None
        self._refreshed_at = float("-inf")
        self._refresh_failure: BaseException | None = None  # why no node gave a map

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        # A Redis error reply says what is wrong (no cluster support, no slot served).
        said = f": {exc}" if isinstance(exc, ResponseError) else ""
        return StoreUnavailable(
            f"Redis Cluster at {redact_url(self.url)} did not answer while {doing}",
            found=type(exc).__name__ + said,
            fix="Check that the nodes run, every slot has a primary (redis-cli --cluster "
            "check), and the URL, password and TLS settings are right",
        )

    def _pipeline(self, host: str, port: int) -> AutoPipeline:
        pipeline = self._pipelines.get((host, port))
        if pipeline is None:
            settings = connection_settings(self._address.node_url(host, port), self._password)
            pipeline = AutoPipeline(settings, self._timeout, unavailable=self._unavailable)
            self._pipelines[(host, port)] = pipeline
        return pipeline

    # The slot map.

    async def _refresh(self) -> bool:
        """Read ``CLUSTER SLOTS`` from the first node that answers (the primaries known,
        then the seeds); False when none did."""
        owners = set(self._owner)
        known = [address for address, p in self._pipelines.items() if p in owners]
        candidates = [*known, *(a for a in self._address.seeds if a not in known)]
        for host, port in candidates:
            try:
                reply = await self._pipeline(host, port).call(CLUSTER_SLOTS, "reading slots")
            except StoreUnavailable as exc:
                self._refresh_failure = exc.__cause__ or exc
                continue
            self._apply(cast("list[list[Reply]]", reply), host)
            return True
        return False

    def _apply(self, ranges: list[list[Reply]], asked: str) -> None:
        owner: list[AutoPipeline | None] = [None] * SLOTS
        for start, end, primary, *_ in ranges:
            host_reply, port_reply = cast("list[Reply]", primary)[:2]
            host = cast(bytes, host_reply).decode() or asked  # "" : the node we asked
            pipeline = self._pipeline(host, cast(int, port_reply))
            first, last = cast(int, start), cast(int, end)
            owner[first : last + 1] = [pipeline] * (last - first + 1)
        self._owner = owner

    def _refresh_task(self) -> asyncio.Task[bool]:
        """The refresh in flight in this event loop, or a new one."""
        loop = asyncio.get_running_loop()
        task = self._refreshing
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refreshing = loop.create_task(self._refresh())
            self._refreshed_at = loop.time()
        return task

    def _refresh_soon(self) -> None:
        """Read the map again in the background, at most every ``REFRESH_SECONDS``."""
        if asyncio.get_running_loop().time() - self._refreshed_at >= REFRESH_SECONDS:
            self._refresh_task()

    async def _owner_of(self, slot: int, doing: str) -> AutoPipeline:
        pipeline = self._owner[slot]
        if pipeline is None:
            await asyncio.shield(self._refresh_task())
            pipeline = self._owner[slot]
        if pipeline is None:
            failure = self._refresh_failure or RedisConnectionError("no node serves the slot")
            raise self._unavailable(doing, failure)
        return pipeline

    # Commands.

    async def _call(self, slot: int, command: bytes, doing: str) -> Reply:
        """One command to the owner of ``slot``, following MOVED and ASK."""
        pipeline = self._owner[slot] or await self._owner_of(slot, doing)
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                if not asking:
                    return await pipeline.call(command, doing)
                replies = await pipeline.call(ASKING + command, doing, 2)
                return cast("list[Reply]", replies)[1]
            except StoreUnavailable as exc:
                moved = redirection(exc.__cause__)
                if moved is None:
                    if node_lost(exc.__cause__):
                        self._refresh_soon()
                    raise
                asking, _, host, port = moved
                pipeline = self._pipeline(host, port)
                if not asking:
                    self._owner[slot] = pipeline
                    self._refresh_soon()
        raise self._unavailable(doing, RedisError(f"more than {MAX_REDIRECTS} redirections"))

    async def state(self, namespace: str) -> NamespaceState:
        """As ``RedisReader.state``: ``ValueError`` for a key that holds no state."""
        key = redis_state_key(namespace)
        try:
            reply = await self._call(int(key_slot(key)), resp(b"GET", key), "reading the namespace")
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, ResponseError) and str(exc.__cause__).startswith(
                "WRONGTYPE"
            ):
                raise ValueError(f"the state key of '{namespace}' is not a string") from None
            raise
        raw = cast("bytes | None", reply)
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    async def _primaries(self) -> list[AutoPipeline]:
        if self._owner[0] is None:
            await self._owner_of(0, "reading slots")
        return list(dict.fromkeys(p for p in self._owner if p is not None))

    async def namespaces(self) -> list[str]:
        """SCAN over state keys on every primary (never data keys)."""
        names: set[str] = set()
        for pipeline in await self._primaries():
            cursor = b"0"
            while True:
                command = resp(b"SCAN", cursor, b"MATCH", STATE_PATTERN, b"COUNT", b"1000")
                page = await pipeline.call(command, "listing namespaces")
                cursor, keys = cast("tuple[bytes, list[bytes]]", page)
                names.update(name for name in map(namespace_of, keys) if name is not None)
                if cursor == b"0":
                    break
        return sorted(names)

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> Awaitable[bytes | None]:
        if info.expires_at is not None and info.expired():
            return done_future(None)
        bucket = bucket_of(key, info.buckets)
        prefix = hget_prefix(namespace, info.version, bucket, info.encoding)
        slot = bucket_slot(namespace, info.version, bucket, info.encoding)
        command = b"%s$%d\r\n%s\r\n" % (prefix, len(key), key)
        # HGET: a bulk string or nil (no ``cast``: a function call on every lookup)
        return self._call(slot, command, f"reading '{namespace}'")  # type: ignore[return-value]

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        """One HMGET per bucket, those of one node in one pipelined call, all nodes at
        once; a node's call that met a redirection is done again bucket by bucket."""
        if len(keys) == 1:
            return [await self.get_one(namespace, info, keys[0])]
        if info.expires_at is not None and info.expired():
            return [None] * len(keys)
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            by_bucket[bucket_of(key, info.buckets)].append(i)
        doing = f"reading '{namespace}'"
        by_node: dict[AutoPipeline, list[tuple[int, int, bytes]]] = defaultdict(list)
        for bucket, positions in by_bucket.items():
            slot = bucket_slot(namespace, info.version, bucket, info.encoding)
            head = hmget_head(namespace, info.version, bucket, info.encoding)
            parts = [b"*%d\r\n%s" % (len(positions) + 2, head)]
            parts += (b"$%d\r\n%s\r\n" % (len(keys[i]), keys[i]) for i in positions)
            owner = self._owner[slot] or await self._owner_of(slot, doing)
            by_node[owner].append((bucket, slot, b"".join(parts)))
        found: list[bytes | None] = [None] * len(keys)
        calls = [self._node_batch(p, commands, doing) for p, commands in by_node.items()]
        for node_replies in await asyncio.gather(*calls):
            for bucket, reply in node_replies:
                values = cast("list[bytes | None]", reply)
                for i, value in zip(by_bucket[bucket], values, strict=True):
                    found[i] = value
        return found

    async def _node_batch(
        self, pipeline: AutoPipeline, commands: list[tuple[int, int, bytes]], doing: str
    ) -> list[tuple[int, Reply]]:
        """One node's HMGETs ``(bucket, slot, command)`` in one call: ``(bucket, reply)``."""
        data = b"".join(command for _, _, command in commands)
        try:
            replies = await pipeline.call(data, doing, len(commands))
            buckets = (bucket for bucket, _, _ in commands)
            return list(zip(buckets, cast("list[Reply]", replies), strict=True))
        except StoreUnavailable as exc:
            if redirection(exc.__cause__) is None:
                if node_lost(exc.__cause__):
                    self._refresh_soon()
                raise
        return [(bucket, await self._call(slot, c, doing)) for bucket, slot, c in commands]

    async def ping(self) -> None:
        """PING every primary: the API is ready when every slot's node answers."""
        primaries = await self._primaries()
        try:
            await asyncio.gather(
                *(p.call(resp(b"PING"), "checking the connection") for p in primaries)
            )
        except StoreUnavailable:
            self._refresh_soon()
            raise

    async def close(self) -> None:
        task = self._refreshing
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for pipeline in self._pipelines.values():
            await pipeline.close()


__all__ = ["RedisClusterReader", "bucket_slot", "node_lost", "redirection"]
