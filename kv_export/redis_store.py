"""Redis: versions as bucketed hashes, the namespace state as one WATCHed key.

Layout (see ``kv_export.encoding``): ``bs:{<ns>}:state`` holds the namespace
state as JSON; a version's predictions live in hashes of about 64 fields
(``bs:{<ns>:v<n>:g<group>}:b<bucket>``), which Redis keeps in its compact
listpack encoding. Bulk loading sends raw RESP built with Arrow/numpy
(``encoding.redis_hset_payload``): one multi-field HSET per bucket, thousands
of commands per write, one chunk in flight while the previous chunk's replies
are read; several writers (threads, each with its own connection) load at once.
A lookup is one HGET, or one pipelined round trip of HMGETs. Deleting a version
is one UNLINK per group of buckets (one Cluster slot each); never KEYS or SCAN
over data keys.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar, cast

import numpy as np
import pyarrow as pa
import redis
from redis.connection import ConnectionInterface
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.typing import EncodableT, FieldT

from kv_export.base import StateBackedStore
from kv_export.encoding import (
    ENCODING,
    bucket_of,
    redis_bucket_groups,
    redis_bucket_key,
    redis_hset_payload,
    redis_state_key,
)
from kv_export.errors import StoreAuthFailed, StoreError, StoreUnavailable
from kv_export.interface import redact_url
from kv_export.state import NamespaceState, VersionInfo

T = TypeVar("T")

PIPELINE_KEYS = 20_000
CHUNK_COMMANDS = 4096  # HSETs per raw write: ~260k keys at 64 a bucket
STATE_PATTERN = "bs:{*}:state"


def redis_client(url: str, *, timeout_seconds: float, password: str | None = None) -> redis.Redis:
    """A client for ``redis://`` / ``rediss://`` (TLS) / ``unix://`` URLs.

    A password in the URL wins over ``password``; TLS options go in the URL's
    query (``rediss://host:6380/0?ssl_ca_certs=/path/ca.pem``), as redis-py reads them.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry_on_timeout=False,
        **_password_option(url, password),
    )


def _password_option(url: str, password: str | None) -> dict[str, str]:
    if password and not redis.connection.parse_url(url).get("password"):
        return {"password": password}
    return {}


class RedisStore(StateBackedStore):
    parallel_writers = 2  # measured: two connections beat one (docs/benchmarks.md)

    def __init__(
        self, url: str, *, timeout_seconds: float = 5.0, password: str | None = None
    ) -> None:
        self.url = url
        self._client = redis_client(url, timeout_seconds=timeout_seconds, password=password)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except redis.AuthenticationError as exc:
            raise StoreAuthFailed(
                f"Redis at {redact_url(self.url)} refused the credentials while {doing}",
                found=str(exc),
                fix="Set BATCHSCORE_STORE_PASSWORD to the server's password (an ACL user goes "
                "in the URL: redis://USER@host:port/db)",
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} did not answer while {doing}",
                found=type(exc).__name__ + ": " + str(exc),
                fix="Check that the server runs and the URL, password and TLS settings are right",
            ) from exc
        except redis.exceptions.NoPermissionError as exc:
            raise StoreError(
                f"Redis at {redact_url(self.url)} refused a command to this ACL user while {doing}",
                found=str(exc),
                fix="Grant the user the rights docs/stores.md lists (An ACL user), or name "
                "another user in the store URL",
            ) from exc
        except RedisError as exc:
            raise StoreError(
                f"Redis at {redact_url(self.url)} refused a command while {doing}",
                found=type(exc).__name__ + ": " + str(exc),
            ) from exc

    def _read(self, namespace: str) -> NamespaceState:
        with self._errors(f"reading namespace '{namespace}'"):
            raw = self._client.get(redis_state_key(namespace))
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    def _update(
        self, namespace: str, change: Callable[[NamespaceState], tuple[NamespaceState, T]]
    ) -> T:
        key = redis_state_key(namespace)
        with self._errors(f"updating namespace '{namespace}'"):
            with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        state = NamespaceState.model_validate_json(raw) if raw else NamespaceState()
                        new, result = change(state)
                        if new is not state:
                            pipe.multi()
                            pipe.set(key, new.model_dump_json())
                            pipe.execute()
                        else:
                            pipe.unwatch()
                        return result
                    except WatchError:
                        continue

    def namespaces(self) -> list[str]:
        with self._errors("listing namespaces"):
            # Namespaces are few; this SCAN matches state keys only and is never on the hot path.
            keys = self._client.scan_iter(match=STATE_PATTERN, count=1000)
            return sorted(k.decode()[len("bs:{") : -len("}:state")] for k in keys)

    def write(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None:
        by_bucket: dict[int, dict[FieldT, EncodableT]] = defaultdict(dict)
        for key, value in zip(keys, values, strict=True):
            by_bucket[bucket_of(key, info.buckets)][key] = value
        with self._errors(f"loading version {info.version} of '{namespace}'"):
            pipe = self._client.pipeline(transaction=False)
            pending = 0
            for bucket, mapping in by_bucket.items():
                pipe.hset(
                    redis_bucket_key(namespace, info.version, bucket, info.encoding),
                    mapping=mapping,
                )
                pending += len(mapping)
                if pending >= PIPELINE_KEYS:
                    pipe.execute()
                    pending = 0
            pipe.execute()

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        """Raw pipelined HSETs on one connection of the pool (one per calling thread).

        Chunk i+1 is sent before chunk i's replies are read, so Redis parses
        while the client reads; replies are a few bytes per command, so two
        chunks in flight never fill a socket buffer.
        """
        if info.encoding != ENCODING:  # a retry into a version of the older layout
            super().write_columns(namespace, info, keys, values)
            return
        chunks = redis_hset_payload(
            namespace, info.version, info.buckets, keys, values, chunk_commands=CHUNK_COMMANDS
        )
        with self._errors(f"loading version {info.version} of '{namespace}'"):
            connection = self._client.connection_pool.get_connection()
            try:
                waiting = 0
                for payload, commands in chunks:
                    connection.send_packed_command([payload], check_health=False)
                    self._read_replies(connection, waiting)
                    waiting = commands
                self._read_replies(connection, waiting)
            except BaseException:
                connection.disconnect()
                raise
            finally:
                self._client.connection_pool.release(connection)

    @staticmethod
    def _read_replies(connection: ConnectionInterface, count: int) -> None:
        for _ in range(count):
            reply = connection.read_response()
            if isinstance(reply, ResponseError):
                raise reply

    def expire_version_data(self, namespace: str, info: VersionInfo) -> None:
        """EXPIREAT on every bucket of the version, pipelined per slot group."""
        assert info.expires_at is not None
        from datetime import datetime

        at = math.ceil(datetime.fromisoformat(info.expires_at).timestamp())
        with self._errors(f"setting the TTL of version {info.version} of '{namespace}'"):
            for group in redis_bucket_groups(namespace, info.version, info.buckets, info.encoding):
                pipe = self._client.pipeline(transaction=False)
                for name in group:
                    pipe.expireat(name, at)
                pipe.execute()

    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        if info.expired():
            return [None] * len(keys)
        if len(keys) == 1:
            name = redis_bucket_key(
                namespace, info.version, bucket_of(keys[0], info.buckets), info.encoding
            )
            with self._errors(f"reading '{namespace}'"):
                return [cast(bytes | None, self._client.hget(name, keys[0]))]
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            by_bucket[bucket_of(key, info.buckets)].append(i)
        pipe = self._client.pipeline(transaction=False)
        for bucket, positions in by_bucket.items():
            pipe.hmget(
                redis_bucket_key(namespace, info.version, bucket, info.encoding),
                [keys[i] for i in positions],
            )
        with self._errors(f"reading '{namespace}'"):
            replies = pipe.execute()
        found: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(by_bucket.values(), replies, strict=True):
            for i, value in zip(positions, reply, strict=True):
                found[i] = value
        return found

    def delete_version_data(self, namespace: str, info: VersionInfo) -> None:
        """One UNLINK per group of tracked bucket keys (one slot each); no SCAN, no KEYS."""
        with self._errors(f"deleting version {info.version} of '{namespace}'"):
            for group in redis_bucket_groups(namespace, info.version, info.buckets, info.encoding):
                self._client.unlink(*group)

    def ping(self) -> None:
        with self._errors("checking the connection"):
            self._client.ping()

    def close(self) -> None:
        self._client.close()
