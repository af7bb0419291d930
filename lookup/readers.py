"""Open the async read side of the store a URL names (the lookup API's only store access).

Which reader serves which URL scheme is the one table of ``kv_export.backends``, the same
one ``kv_export.store.open_store`` uses for the pipeline's stores.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kv_export.backends import backend_for
from kv_export.connect import StoreTarget, store_target
from kv_export.interface import AsyncPredictionReader, SingleKeyReader
from kv_export.state import VersionInfo

if TYPE_CHECKING:
    from batchscore.core.settings import ApiSettings

GetOne = Callable[[str, VersionInfo, bytes], Awaitable[bytes | None]]


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
    return backend_for(target.url).open_reader(
        target.url, timeout_seconds=target.timeout_seconds, password=target.password
    )


__all__ = ["GetOne", "SingleKeyReader", "open_reader", "reader_from_settings", "single_key_read"]
