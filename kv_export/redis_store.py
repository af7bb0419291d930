"""Redis: versions as bucketed hashes, the namespace state as one WATCHed key.

Layout (see ``kv_export.encoding``): ``bs:{<ns>}:state`` holds the namespace
state as JSON; a version's predictions live in ``bs:<ns>:v<n>:b<bucket>`` hashes
of about 64 fields, which Redis keeps in its compact listpack encoding. Loading
uses pipelined multi-field HSETs; a lookup is one pipelined round trip of
HMGETs; deleting a version is one UNLINK per bucket, never KEYS or SCAN.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import redis
from redis.exceptions import RedisError, WatchError

from kv_export.base import StateBackedStore
from kv_export.encoding import bucket_of, redis_bucket_key, redis_state_key
from kv_export.errors import StoreError, StoreUnavailable
from kv_export.store import NamespaceState, VersionInfo, redact_url

T = TypeVar("T")

PIPELINE_KEYS = 20_000
UNLINK_BATCH = 1_000
STATE_PATTERN = "bs:{*}:state"


class RedisStore(StateBackedStore):
    def __init__(self, url: str, *, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry_on_timeout=False,
        )

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} did not answer while {doing}",
                found=type(exc).__name__ + ": " + str(exc),
                fix="Check that the server runs and the URL, password and TLS settings are right",
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
        by_bucket: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        for key, value in zip(keys, values, strict=True):
            by_bucket[bucket_of(key, info.buckets)][key] = value
        with self._errors(f"loading version {info.version} of '{namespace}'"):
            pipe = self._client.pipeline(transaction=False)
            pending = 0
            for bucket, mapping in by_bucket.items():
                pipe.hset(redis_bucket_key(namespace, info.version, bucket), mapping=mapping)
                pending += len(mapping)
                if pending >= PIPELINE_KEYS:
                    pipe.execute()
                    pending = 0
            pipe.execute()

    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        if len(keys) == 1:
            bucket = redis_bucket_key(namespace, info.version, bucket_of(keys[0], info.buckets))
            with self._errors(f"reading '{namespace}'"):
                return [self._client.hget(bucket, keys[0])]
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            by_bucket[bucket_of(key, info.buckets)].append(i)
        pipe = self._client.pipeline(transaction=False)
        for bucket, positions in by_bucket.items():
            pipe.hmget(
                redis_bucket_key(namespace, info.version, bucket), [keys[i] for i in positions]
            )
        with self._errors(f"reading '{namespace}'"):
            replies = pipe.execute()
        found: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(by_bucket.values(), replies, strict=True):
            for i, value in zip(positions, reply, strict=True):
                found[i] = value
        return found

    def delete_version_data(self, namespace: str, info: VersionInfo) -> None:
        names = [redis_bucket_key(namespace, info.version, b) for b in range(info.buckets)]
        with self._errors(f"deleting version {info.version} of '{namespace}'"):
            for start in range(0, len(names), UNLINK_BATCH):
                self._client.unlink(*names[start : start + UNLINK_BATCH])

    def ping(self) -> None:
        with self._errors("checking the connection"):
            self._client.ping()

    def close(self) -> None:
        self._client.close()


class AsyncRedisReader:
    """Read-only async access for the lookup API (``redis.asyncio``), with tight timeouts.

    No retries: a failed or slow call raises ``StoreUnavailable`` after at most
    ``timeout_seconds`` so the caller can fall back at once. A lookup is one
    round trip: one HGET for one key, one pipeline of HMGETs for a batch.
    """

    def __init__(self, url: str, *, timeout_seconds: float = 0.5) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0),
        )

    def _unavailable(self, doing: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(
            f"Redis at {redact_url(self.url)} did not answer while {doing}",
            found=type(exc).__name__,
            fix="Check that the server runs and the URL, password and TLS settings are right",
        )

    async def state(self, namespace: str) -> NamespaceState:
        try:
            raw = await self._client.get(redis_state_key(namespace))
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"reading namespace '{namespace}'", exc) from exc
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    async def namespaces(self) -> list[str]:
        try:
            keys = [k async for k in self._client.scan_iter(match=STATE_PATTERN, count=1000)]
        except (RedisError, OSError) as exc:
            raise self._unavailable("listing namespaces", exc) from exc
        return sorted(k.decode()[len("bs:{") : -len("}:state")] for k in keys)

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        try:
            if len(keys) == 1:
                name = redis_bucket_key(namespace, info.version, bucket_of(keys[0], info.buckets))
                return [await self._client.hget(name, keys[0])]  # type: ignore[misc]
            by_bucket: dict[int, list[int]] = defaultdict(list)
            for i, key in enumerate(keys):
                by_bucket[bucket_of(key, info.buckets)].append(i)
            pipe = self._client.pipeline(transaction=False)
            for bucket, positions in by_bucket.items():
                pipe.hmget(
                    redis_bucket_key(namespace, info.version, bucket), [keys[i] for i in positions]
                )
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"reading '{namespace}'", exc) from exc
        found: list[bytes | None] = [None] * len(keys)
        for positions, reply in zip(by_bucket.values(), replies, strict=True):
            for i, value in zip(positions, reply, strict=True):
                found[i] = value
        return found

    async def ping(self) -> None:
        try:
            await self._client.ping()  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise self._unavailable("checking the connection", exc) from exc

    async def close(self) -> None:
        await self._client.aclose()
