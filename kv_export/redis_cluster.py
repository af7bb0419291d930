"""Redis Cluster: the Redis layout and operations, routed by slot (``redis+cluster://``).

The layout needs no change for a cluster (``kv_export.redis_store``): the namespace
state is one key, ``bs:{<ns>}:state``, so WATCH/MULTI/EXEC on it runs on the one
primary that owns its slot and a publish stays one atomic change; every multi-key
command (UNLINK, the EXPIREAT pipeline) is within one bucket group, whose keys share
the hash tag ``{<ns>:v<n>:g<group>}``; loads and lookups are single-key commands.

redis-py's ``RedisCluster`` carries the state changes (its transactional pipeline
WATCHes one slot's key on one connection), the reads, the deletes and the namespace
listing (SCAN on every primary), following MOVED/ASK and re-reading the slot map as
it does. Bulk loading keeps the raw pipelined HSETs of the single-server store: the
payload is cut so that a chunk never leaves its bucket group (one slot), each chunk
goes to the primary that owns its slot on a connection of that node's pool, one
chunk in flight per node while the previous one's replies are read. A chunk with a
redirected command (a slot moved or moving: MOVED, ASK, TRYAGAIN) is sent again
through redis-py's cluster pipeline, which follows the redirections; HSET of the same
fields is idempotent, so a resent command changes nothing that was already written.
Each load ends with ``WAIT 1`` on every primary it wrote to that has a replica, so a
replica holds every acknowledged key before the version can be completed. A load that
loses a node (a primary killed, the cluster down while its replica takes over, no
replica acknowledging) is retried whole, with the slot map read again, for up to
``failover_seconds``; after that the export fails with ``StoreUnavailable`` and
publishes nothing, so the live version stays as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import hiredis
import numpy as np
import pyarrow as pa
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionInterface
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kv_export.base import StateBackedStore
from kv_export.encoding import ENCODING, redis_hset_payload
from kv_export.errors import StoreAuthFailed, StoreUnavailable
from kv_export.interface import redact_url
from kv_export.redis_cluster_url import cluster_address
from kv_export.redis_store import CHUNK_COMMANDS, STATE_PATTERN, RedisStore
from kv_export.state import VersionInfo

FAILOVER_SECONDS = 20.0  # a load waits this long for a lost primary's replica to take over
RETRIES = 8  # redis-py's retries of a command after a connection error or CLUSTERDOWN
NODE_LOST = (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException)


def cluster_client(
    url: str, *, timeout_seconds: float, password: str | None = None
) -> RedisCluster:
    """A ``RedisCluster`` for a ``redis+cluster://`` / ``rediss+cluster://`` URL: every seed
    as a startup node, the URL's credentials and options for every node."""
    address = cluster_address(url)
    (host, port), *others = address.seeds
    options: dict[str, Any] = {"password": password} if password else {}
    return RedisCluster(
        url=address.node_url(host, port),  # its password and options win over ``options``
        startup_nodes=[ClusterNode(h, p) for h, p in others],
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), RETRIES),
        **options,
    )


def first_key(payload: memoryview) -> bytes:
    """The key of the first command of a raw RESP chunk (``*n $4 HSET $len key ...``)."""
    head = bytes(payload[:64])
    parts = head.split(b"\r\n", 4)
    length = int(parts[3][1:])
    start = len(parts[0]) + len(parts[1]) + len(parts[2]) + len(parts[3]) + 8
    return bytes(payload[start : start + length])


def _refused_credentials(exc: BaseException) -> bool:
    """redis-py reports a refused AUTH at startup inside a ``RedisClusterException``."""
    causes = (exc.__cause__, exc.__context__)
    if any(isinstance(c, AuthenticationError) for c in causes):
        return True
    return any(words in str(exc) for words in ("username-password", "NOAUTH", "Authentication"))


class RedisClusterStore(RedisStore):
    """``PredictionStore`` over a Redis Cluster: ``RedisStore``'s operations, routed."""

    parallel_writers = 2  # each writer keeps one connection per primary

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 5.0,
        password: str | None = None,
        failover_seconds: float = FAILOVER_SECONDS,
    ) -> None:
        self.url = url
        self._failover_seconds = failover_seconds
        self._wait_ms = 500 * timeout_seconds  # within the socket timeout
        with self._errors("connecting"):
            self._client = cluster_client(  # type: ignore[assignment]
                url, timeout_seconds=timeout_seconds, password=password
            )

    @property
    def cluster(self) -> RedisCluster:
        return self._client  # type: ignore[return-value]

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        with super()._errors(doing):
            try:
                yield
            except (ClusterDownError, RedisClusterException) as exc:
                if _refused_credentials(exc):
                    raise StoreAuthFailed(
                        f"Redis Cluster at {redact_url(self.url)} refused the credentials "
                        f"while {doing}",
                        found=str(exc),
                        fix="Set BATCHSCORE_STORE_PASSWORD to the nodes' password (an ACL "
                        "user goes in the URL: redis+cluster://USER@host:port,...)",
                    ) from exc
                raise StoreUnavailable(
                    f"Redis Cluster at {redact_url(self.url)} could not serve while {doing}",
                    found=type(exc).__name__ + ": " + str(exc),
                    fix="Check that every slot has a running primary (redis-cli --cluster "
                    "check) and the URL names nodes of the cluster",
                ) from exc

    def namespaces(self) -> list[str]:
        with self._errors("listing namespaces"):
            # SCAN on every primary; state keys only, never on the hot path.
            keys = self.cluster.scan_iter(match=STATE_PATTERN, count=1000)
            return sorted({k.decode()[len("bs:{") : -len("}:state")] for k in keys})

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        """Raw pipelined HSETs, each chunk to the primary of its slot (see the module)."""
        if info.encoding != ENCODING:  # a retry into a version of the older layout
            StateBackedStore.write_columns(self, namespace, info, keys, values)
            return
        chunks = redis_hset_payload(
            namespace,
            info.version,
            info.buckets,
            keys,
            values,
            chunk_commands=CHUNK_COMMANDS,
            split_groups=True,
        )
        deadline = time.monotonic() + self._failover_seconds
        with self._errors(f"loading version {info.version} of '{namespace}'"):
            while True:
                try:
                    redirected = self._send(chunks)
                    break
                except NODE_LOST:
                    if time.monotonic() > deadline:
                        raise
                    self._refresh_slots()
            for payload in redirected:
                self._resend(payload)

    def _refresh_slots(self) -> None:
        """Wait a little, then read the slot map again (a replica may have taken over)."""
        time.sleep(0.25)
        try:
            self.cluster.nodes_manager.initialize()
        except NODE_LOST:
            pass  # no node answered yet: the next attempt fails and comes back here

    def _send(self, chunks: Sequence[tuple[memoryview, int]]) -> list[memoryview]:
        """Send every chunk to its slot's primary, one chunk in flight per node; the
        chunks that had a redirected command, to be sent again."""
        opened: dict[str, tuple[Any, ConnectionInterface]] = {}
        waiting: dict[str, tuple[memoryview, int]] = {}
        redirected: list[memoryview] = []
        nodes = self.cluster.nodes_manager
        try:
            for payload, commands in chunks:
                node = nodes.get_node_from_slot(self.cluster.keyslot(first_key(payload)))
                if node.name not in opened:
                    client = self.cluster.get_redis_connection(node)
                    opened[node.name] = (client, client.connection_pool.get_connection())
                connection = opened[node.name][1]
                connection.send_packed_command([payload], check_health=False)
                if node.name in waiting:
                    redirected += self._replies(connection, *waiting[node.name])
                waiting[node.name] = (payload, commands)
            for name, (payload, commands) in waiting.items():
                redirected += self._replies(opened[name][1], payload, commands)
            for name, (_, connection) in opened.items():
                self._replicated(name, connection)
        except BaseException:
            for _, connection in opened.values():
                connection.disconnect()
            raise
        finally:
            for client, connection in opened.values():
                client.connection_pool.release(connection)
        return redirected

    def _replicated(self, name: str, connection: ConnectionInterface) -> None:
        """WAIT until a replica of the node has every write sent to it, if it has one
        (``ROLE``): a primary killed after acknowledging a load then hands over to a
        replica that has the load too (replication is asynchronous; without this a
        failover could lose acknowledged keys of a version that is then published)."""
        connection.send_command("ROLE")
        role = connection.read_response()
        if not role[2:] or not role[2]:  # a primary: ["master", offset, [replicas]]
            return
        connection.send_command("WAIT", 1, int(self._wait_ms))
        if int(connection.read_response()) < 1:
            raise RedisConnectionError(
                f"no replica of {name} acknowledged the load within {self._wait_ms:.0f} ms"
            )

    @staticmethod
    def _replies(
        connection: ConnectionInterface, payload: memoryview, count: int
    ) -> list[memoryview]:
        """Read a chunk's ``count`` replies: ``[payload]`` if one was a redirection, ``[]``
        if all succeeded; a CLUSTERDOWN is raised once the chunk's replies are read."""
        moved = False
        down: ClusterDownError | None = None
        for _ in range(count):
            try:
                reply = connection.read_response()
            except (AskError, TryAgainError):  # MovedError is an AskError
                moved = True
                continue
            except ClusterDownError as exc:
                down = exc
                continue
            if isinstance(reply, ResponseError):
                raise reply
        if down is not None:
            raise down
        return [payload] if moved else []

    def _resend(self, payload: memoryview) -> None:
        """The chunk's commands again, through redis-py's cluster pipeline (MOVED/ASK)."""
        reader = hiredis.Reader()
        reader.feed(bytes(payload))
        pipe = self.cluster.pipeline(transaction=False)
        while (command := reader.gets()) is not False:
            pipe.execute_command(*command)
        pipe.execute()


__all__ = ["RedisClusterStore", "cluster_client", "first_key"]
