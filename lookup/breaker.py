"""The store's circuit breaker (purgatory, asyncio-native), with the probe off the request path.

After ``failures`` consecutive failed store calls the circuit opens. While it is
not closed no call reaches the store: every call fails at once with
``CircuitOpen`` (no socket, no timeout) so the API answers from the fallback at
full speed. Once ``reset_seconds`` have passed, the next call starts one probe
(``probe``, a PING) in the background and still fails at once; the probe alone
goes through purgatory's half-open state, and its success closes the circuit,
its failure opens it for another ``reset_seconds``. So no request ever waits for
a probe, and at most one probe is in flight.

Why requests never enter purgatory while the circuit is open: purgatory raises
one ``OpenedState`` instance for every refused call, and an exception instance
that is raised again keeps its traceback and grows it, so every refused call's
frames stayed alive (10,000 frames after a few seconds of fallback traffic, and
collections of 35-140 ms that were the fallback's p99).

Only ``StoreUnavailable`` counts as a store failure: a cancelled call (a client that went
away) does not, nor does any other error (a record that cannot be parsed is a data error of
one namespace, and must not cut every namespace off the store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from kv_export.errors import StoreUnavailable
from lookup.errors import CircuitOpen

T = TypeVar("T")
STATE_VALUES = {"closed": 0, "half-opened": 1, "opened": 2}


class StoreBreaker:
    def __init__(
        self, failures: int, reset_seconds: float, probe: Callable[[], Awaitable[object]]
    ) -> None:
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=failures,
            default_ttl=reset_seconds,
            exclude=[asyncio.CancelledError],
        )
        self._breaker: Any = None
        self._probe = probe
        self._probing: asyncio.Task[None] | None = None

    async def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``function(*args)`` if the circuit is closed; ``CircuitOpen`` at once otherwise.

        In the closed state this does what purgatory's ``async with breaker`` does
        (count the failure or the recovery, then hand purgatory's events to its
        message bus) without its two coroutines per call when nothing happened.
        """
        breaker = self._breaker or await self._create()
        context = breaker.context
        if context.state != "closed":
            self._maybe_probe(context)
            raise CircuitOpen()
        try:
            result = await function(*args)
        except StoreUnavailable as exc:
            await self.failed(exc)
            raise
        if context.failure_count:
            await self.succeeded()
        return result

    async def failed(self, exc: BaseException) -> None:
        """Count a store call that raised ``exc``, as ``call`` does: for a caller that made the
        call itself after ``refuses()`` said no, with nothing awaited in between."""
        breaker = self._breaker or await self._create()
        breaker.context.handle_exception(exc)
        await self._publish(breaker)

    def recovering(self) -> bool:
        """Failures were counted since the last success: the next success must reset them
        (``succeeded``). False on the hot path, so a success costs no coroutine there."""
        return self._breaker is not None and bool(self._breaker.context.failure_count)

    async def succeeded(self) -> None:
        """Count a store call that succeeded while ``recovering()``, as ``call`` does."""
        breaker = self._breaker
        breaker.context.handle_end_request()
        await self._publish(breaker)

    @staticmethod
    async def _publish(breaker: Any) -> None:
        while breaker.context.messages:
            await breaker.messagebus.handle(breaker.context.messages.pop(0), breaker.uow)

    def refuses(self) -> bool:
        """The circuit is not closed: a call would fail with ``CircuitOpen`` (and this starts
        the background probe when one is due). A check for the hot path, without raising."""
        breaker = self._breaker
        if breaker is None or breaker.context.state == "closed":
            return False
        self._maybe_probe(breaker.context)
        return True

    async def _create(self) -> Any:
        self._breaker = await self._factory.get_breaker("store")
        return self._breaker

    def _maybe_probe(self, context: Any) -> None:
        if self._probing is not None:
            return
        if context.state == "opened" and time.time() < context.opened_at + context.ttl:
            return
        self._probing = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> None:
        try:
            async with self._breaker:
                await self._probe()
        except OpenedState as exc:
            exc.__traceback__ = None
        except Exception:  # recorded by purgatory: the circuit stays open another while
            pass
        finally:
            self._probing = None

    @property
    def state(self) -> str:
        """'closed', 'half-opened' or 'opened' (purgatory's names)."""
        return "closed" if self._breaker is None else str(self._breaker.context.state)
