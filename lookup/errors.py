"""Errors the lookup API answers with: one class, mapped to a status and a JSON body in one place.

::

    ApiError            status, code, message (and optional headers); safe to show a client
    StoreUnavailable    (kv_export.errors) the store did not answer; the API falls back or 503s
    └── CircuitOpen     the breaker is open: the store was not even asked
"""

from __future__ import annotations

from kv_export.errors import StoreUnavailable


class ApiError(Exception):
    """An answer for the client; ``message`` never holds internals (paths, hosts, tracebacks)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


class CircuitOpen(StoreUnavailable):
    """The store's circuit breaker is open: no call was made."""

    def __init__(self) -> None:
        super().__init__("The store's circuit breaker is open", fix="Wait for the store to recover")
