"""Which backend serves which store URL: one table for the pipeline's stores
(``kv_export.store.open_store``) and the lookup API's readers (``lookup.readers``).

A backend is a pair of openers for one kind of store, the write side and the async read
side. Each opener imports its module only when a URL of its scheme is opened, so a
process that serves LMDB never loads the Redis clients and the other way round, and
this module imports no backend at import time (backends import ``kv_export.interface``
and ``kv_export.state``, never this table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from kv_export.errors import BadStoreUrl
from kv_export.interface import AsyncPredictionReader, PredictionStore, redact_url

Opened = TypeVar("Opened", covariant=True)


class Opener(Protocol[Opened]):
    """Opens ``url``: ``password`` is used when the URL carries none (a URL's own wins);
    ``timeout_seconds`` bounds each call for a backend that talks to a server."""

    def __call__(self, url: str, *, timeout_seconds: float, password: str | None) -> Opened: ...


@dataclass(frozen=True)
class Backend:
    name: str
    example: str  # the URL form(s) shown when a URL names no known scheme
    open_store: Opener[PredictionStore]
    open_reader: Opener[AsyncPredictionReader]


def _redis_store(url: str, *, timeout_seconds: float, password: str | None) -> PredictionStore:
    from kv_export.redis_store import RedisStore

    return RedisStore(url, timeout_seconds=timeout_seconds, password=password)


def _redis_reader(
    url: str, *, timeout_seconds: float, password: str | None
) -> AsyncPredictionReader:
    from kv_export.redis_reader import RedisReader

    return RedisReader(url, timeout_seconds=timeout_seconds, password=password)


def _redis_cluster_store(
    url: str, *, timeout_seconds: float, password: str | None
) -> PredictionStore:
    from kv_export.redis_cluster import RedisClusterStore

    return RedisClusterStore(url, timeout_seconds=timeout_seconds, password=password)


def _redis_cluster_reader(
    url: str, *, timeout_seconds: float, password: str | None
) -> AsyncPredictionReader:
    from kv_export.redis_cluster_reader import RedisClusterReader

    return RedisClusterReader(url, timeout_seconds=timeout_seconds, password=password)


def _lmdb_path(url: str) -> str:
    """The folder of ``lmdb://PATH`` or of a bare path."""
    path = url[len("lmdb://") :] if urlsplit(url).scheme == "lmdb" else url
    if not path:
        raise BadStoreUrl(f"Store URL '{url}' names no folder", expected="lmdb:///path/to/store")
    return path


def _lmdb_store(url: str, *, timeout_seconds: float, password: str | None) -> PredictionStore:
    from kv_export.lmdb_store import LmdbStore

    return LmdbStore(_lmdb_path(url))  # a local file: no server to time out, no password


def _lmdb_reader(
    url: str, *, timeout_seconds: float, password: str | None
) -> AsyncPredictionReader:
    from kv_export.lmdb_store import LmdbReader

    return LmdbReader(_lmdb_path(url))


LMDB = Backend("lmdb", "lmdb:///path (embedded)", _lmdb_store, _lmdb_reader)
REDIS = Backend(
    "redis", "redis://host:port/db or rediss://host:port/db", _redis_store, _redis_reader
)
REDIS_CLUSTER = Backend(
    "redis-cluster",
    "redis+cluster://host:port,host:port/ (rediss+cluster:// for TLS)",
    _redis_cluster_store,
    _redis_cluster_reader,
)

BACKENDS: dict[str, Backend] = {
    "lmdb": LMDB,
    "": LMDB,  # a bare path
    "redis": REDIS,
    "rediss": REDIS,
    "unix": REDIS,
    "redis+cluster": REDIS_CLUSTER,
    "rediss+cluster": REDIS_CLUSTER,
}


def backend_for(url: str) -> Backend:
    """The backend of ``url``'s scheme; ``BadStoreUrl`` (password redacted) for any other."""
    scheme = urlsplit(url).scheme
    backend = BACKENDS.get(scheme)
    if backend is None:
        forms = list(dict.fromkeys(b.example for b in BACKENDS.values()))
        raise BadStoreUrl(
            f"Store URL '{redact_url(url)}' has an unknown scheme '{scheme}'",
            expected=", ".join(forms),
        )
    return backend


__all__ = ["BACKENDS", "Backend", "Opener", "backend_for"]
