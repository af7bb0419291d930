"""The store's circuit breaker (purgatory, asyncio-native).

After ``failures`` consecutive failed store calls the circuit opens: calls fail
at once with ``CircuitOpen`` (no socket, no timeout) so the API answers from
the fallback at full speed. After ``reset_seconds`` the next call is let
through as a probe; success closes the circuit, failure opens it again.
Cancelled calls (a client that went away) are not counted as store failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from lookup.errors import CircuitOpen

T = TypeVar("T")
STATE_VALUES = {"closed": 0, "half-opened": 1, "opened": 2}


class StoreBreaker:
    def __init__(self, failures: int, reset_seconds: float) -> None:
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=failures,
            default_ttl=reset_seconds,
            exclude=[asyncio.CancelledError],
        )
        self._breaker: Any = None

    async def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._breaker is None:
            self._breaker = await self._factory.get_breaker("store")
        try:
            async with self._breaker:
                return await function(*args)
        except OpenedState:
            raise CircuitOpen() from None

    @property
    def state(self) -> str:
        """'closed', 'half-opened' or 'opened' (purgatory's names)."""
        return "closed" if self._breaker is None else str(self._breaker.context.state)
