"""Errors the lookup API answers with: one class, mapped to a status and a JSON body in one place.

::

    ApiError            status, code, message (and optional headers); safe to show a client
    └── NamespaceStateInvalid  the store holds a namespace state that cannot be read (500)
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


class NamespaceStateInvalid(ApiError):
    """The store answered, but the namespace's state record cannot be parsed (bad JSON, not
    UTF-8, a key of another type). A data error of one namespace: it fails that namespace's
    requests alone and never counts as a store failure (the breaker stays closed).
    ``found`` says what was wrong, for the log only."""

    def __init__(self, namespace: str, found: str) -> None:
        super().__init__(
            500,
            "namespace_state_invalid",
            f"The state of namespace '{namespace}' in the store cannot be read; "
            "it must be republished or repaired",
        )
        self.namespace, self.found = namespace, found
