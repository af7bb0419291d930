"""Open the async read side of the store a URL names (the lookup API's only store access)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlsplit

from kv_export.connect import StoreTarget, store_target
from kv_export.errors import BadStoreUrl
from kv_export.store import AsyncPredictionReader, VersionInfo, redact_url

if TYPE_CHECKING:
    from batchscore.core.settings import ApiSettings

GetOne = Callable[[str, VersionInfo, bytes], Awaitable[bytes | None]]


@runtime_checkable
class SingleKeyReader(Protocol):
    """A reader with a cheaper single-key read than ``get_many``: the same value (or None),
    its failures the same ``StoreUnavailable``, as the cheapest awaitable for the store: the
    pipeline's future for Redis (a lookup waiting on a reply has no extra layer to suspend
    and resume through), a coroutine that returns at once for LMDB (awaiting one costs less
    than a done future)."""

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> Awaitable[bytes | None]: ...


def single_key_read(reader: AsyncPredictionReader) -> GetOne:
    """The reader's ``get_one``, or ``get_many`` of one key for a reader without it."""
    if isinstance(reader, SingleKeyReader):
        return reader.get_one

    async def get_one(namespace: str, info: VersionInfo, key: bytes) -> bytes | None:
        return (await reader.get_many(namespace, info, (key,)))[0]

    return get_one


def reader_from_settings(settings: ApiSettings) -> AsyncPredictionReader:
    """The API's reader of the store the settings name, opened the one way
    (``kv_export.connect``): the same URL and password as every step of a run, with the
    API's tight timeout."""
    return open_reader(store_target(settings, timeout_seconds=settings.store_timeout_seconds))


def open_reader(target: StoreTarget) -> AsyncPredictionReader:
    """``redis[s]://`` → one pipelined connection parsed by hiredis (``password`` when the
    URL carries none); ``lmdb://PATH`` → direct LMDB reads."""
    url = target.url
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from kv_export.redis_reader import RedisReader

        return RedisReader(url, timeout_seconds=target.timeout_seconds, password=target.password)
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
