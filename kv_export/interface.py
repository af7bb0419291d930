"""What every store backend offers: the write side the pipeline drives, the async read
side the lookup API serves from, and the one helper they share (``redact_url``).

Backends (``lmdb_store``, ``redis_store``, ``redis_reader``) import this module and
``kv_export.state``, never the factories (``kv_export.store``, ``kv_export.backends``),
so the factories can import the backends without a cycle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from kv_export.state import NamespaceState, NewVersion, VersionInfo


class PredictionStore(Protocol):
    """Versioned predictions per namespace; readers only ever see published versions."""

    url: str

    def begin_version(self, namespace: str, new: NewVersion) -> VersionInfo: ...

    def write(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None: ...

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        """Bulk load: ``keys`` as ``encoding.text_keys`` makes them, ``values`` (rows, outputs)."""
        ...

    def complete_version(self, namespace: str, version: int, key_count: int) -> VersionInfo: ...

    def publish(
        self, namespace: str, version: int, keep: int, *, force: bool = False
    ) -> VersionInfo: ...

    def rollback(self, namespace: str, to: int | None = None) -> VersionInfo: ...

    def start_canary(
        self, namespace: str, version: int, percent: float, *, force: bool = False
    ) -> NamespaceState:
        """Serve ``version`` to ``percent`` % of the keys (``Canary``); live unchanged."""
        ...

    def set_canary_percent(self, namespace: str, percent: float) -> NamespaceState: ...

    def promote_canary(self, namespace: str, keep: int) -> VersionInfo:
        """The canary becomes live in one step; returns the new live version."""
        ...

    def abort_canary(self, namespace: str) -> NamespaceState: ...

    def state(self, namespace: str) -> NamespaceState: ...

    def namespaces(self) -> list[str]: ...

    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...

    def delete_version_data(self, namespace: str, info: VersionInfo) -> None: ...

    def gc(
        self,
        namespace: str,
        keep: int,
        *,
        loading_grace_seconds: int | None = None,
        spare_run: str | None = None,
        budget_seconds: float | None = None,
    ) -> list[VersionInfo]:
        """Delete what ``NamespaceState.gc`` lets go; return the versions deleted.

        With ``budget_seconds``, stops deleting data once the budget is spent; the rest
        stays in ``deleting`` for the next collection.
        """
        ...

    def set_ttl(self, namespace: str, ttl_seconds: int | None) -> NamespaceState: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class AsyncPredictionReader(Protocol):
    """The read-only, async side of a store, for the lookup API's hot path.

    Every method either answers or raises ``StoreUnavailable`` within the
    store's timeout; ``get_many`` is one round trip whatever the number of keys.
    """

    url: str

    async def state(self, namespace: str) -> NamespaceState: ...

    async def namespaces(self) -> list[str]: ...

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class SingleKeyReader(Protocol):
    """A reader with a cheaper single-key read than ``get_many``: the same value (or None),
    its failures the same ``StoreUnavailable``, as the cheapest awaitable for the store: the
    pipeline's future for Redis (a lookup waiting on a reply has no extra layer to suspend
    and resume through), a coroutine that returns at once for LMDB (awaiting one costs less
    than a done future)."""

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> Awaitable[bytes | None]: ...


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = [
    "AsyncPredictionReader",
    "PredictionStore",
    "SingleKeyReader",
    "redact_url",
]
