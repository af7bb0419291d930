"""``open_store``: the pipeline's store for a URL; and the names other packages import.

The store interface lives in ``kv_export.interface``, the namespace bookkeeping in
``kv_export.state``; this module re-exports both so that ``from kv_export.store import
NamespaceState`` keeps working.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from kv_export.errors import BadStoreUrl, StoreError, VersionExpired, VersionOutOfOrder
from kv_export.interface import AsyncPredictionReader, PredictionStore, redact_url
from kv_export.state import NamespaceState, NewVersion, PartInfo, VersionInfo, VersionOrder, utcnow


def open_store(
    url: str, *, timeout_seconds: float = 5.0, password: str | None = None
) -> PredictionStore:
    """Open the store a URL names: ``lmdb://PATH`` (or a bare path) or ``redis[s]://``.

    ``password`` (``BATCHSCORE_STORE_PASSWORD``) is used for Redis when the URL
    carries none; a password in the URL wins.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from kv_export.redis_store import RedisStore

        return RedisStore(url, timeout_seconds=timeout_seconds, password=password)
    if scheme in ("lmdb", ""):
        from kv_export.lmdb_store import LmdbStore

        path = url[len("lmdb://") :] if scheme == "lmdb" else url
        if not path:
            raise BadStoreUrl(
                f"Store URL '{url}' names no folder", expected="lmdb:///path/to/store"
            )
        return LmdbStore(path)
    raise BadStoreUrl(
        f"Store URL '{redact_url(url)}' has an unknown scheme '{scheme}'",
        expected="lmdb:///path (embedded), redis://host:port/db or rediss://host:port/db",
    )


__all__ = [
    "AsyncPredictionReader",
    "NamespaceState",
    "NewVersion",
    "PartInfo",
    "PredictionStore",
    "StoreError",
    "VersionExpired",
    "VersionInfo",
    "VersionOrder",
    "VersionOutOfOrder",
    "open_store",
    "redact_url",
    "utcnow",
]
