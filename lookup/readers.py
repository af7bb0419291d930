"""Open the async read side of the store a URL names (the lookup API's only store access)."""

from __future__ import annotations

from urllib.parse import urlsplit

from kv_export.errors import BadStoreUrl
from kv_export.store import AsyncPredictionReader, redact_url


def open_reader(
    url: str, *, timeout_seconds: float, password: str | None = None
) -> AsyncPredictionReader:
    """``redis[s]://`` → auto-pipelined redis.asyncio connections with tight timeouts
    (``password`` when the URL carries none); ``lmdb://PATH`` → direct LMDB reads."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from lookup.redis_reader import RedisReader

        return RedisReader(url, timeout_seconds=timeout_seconds, password=password)
    if scheme in ("lmdb", ""):
        from kv_export.lmdb_store import LmdbReader

        path = url[len("lmdb://") :] if scheme == "lmdb" else url
        if not path:
            raise BadStoreUrl(
                f"Store URL '{url}' names no folder", expected="lmdb:///path/to/store"
            )
        return LmdbReader(path)
    raise BadStoreUrl(
        f"Store URL '{redact_url(url)}' has an unknown scheme '{scheme}'",
        expected="lmdb:///path (embedded), redis://host:port/db or rediss://host:port/db",
    )
