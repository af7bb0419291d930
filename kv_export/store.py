"""``open_store``: the pipeline's store for a URL; and the names other packages import.

The store interface lives in ``kv_export.interface``, the namespace bookkeeping in
``kv_export.state``; this module re-exports both so that ``from kv_export.store import
NamespaceState`` keeps working. Which backend serves which URL scheme is decided in one
place, ``kv_export.backends``, for the stores here and for the lookup API's readers.
"""

from __future__ import annotations

from kv_export.backends import backend_for
from kv_export.errors import StoreError, VersionExpired, VersionOutOfOrder
from kv_export.interface import AsyncPredictionReader, PredictionStore, redact_url
from kv_export.state import NamespaceState, NewVersion, PartInfo, VersionInfo, VersionOrder, utcnow


def open_store(
    url: str, *, timeout_seconds: float = 5.0, password: str | None = None
) -> PredictionStore:
    """Open the store a URL names: ``lmdb://PATH`` (or a bare path), ``redis[s]://`` or
    ``redis[s]+cluster://``.

    ``password`` (``BATCHSCORE_STORE_PASSWORD``) is used for Redis when the URL
    carries none; a password in the URL wins.
    """
    return backend_for(url).open_store(url, timeout_seconds=timeout_seconds, password=password)


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
