"""The store's circuit breaker: a pure state machine (``Circuit``) and its asyncio shell
(``StoreBreaker``), which keeps the probe off the request path.

After ``failures`` consecutive failed store calls the circuit opens. While it is
not closed no call reaches the store: every call fails at once with
``CircuitOpen`` (no socket, no timeout) so the API answers from the fallback at
full speed. Once ``reset_seconds`` have passed, the next call starts one probe
(``probe``, a PING) in the background and still fails at once; the probe alone
goes through the half-open state, and its success closes the circuit, its
failure opens it for another ``reset_seconds``. So no request ever waits for a
probe, and at most one probe is in flight.

A refused call raises a new ``CircuitOpen`` each time: an exception instance raised
again keeps its traceback and grows it, which would keep every refused call's frames
alive (what the former breaker library did, at the cost of long garbage collections
under fallback traffic). The hot path does not raise at all: it asks ``refuses()``.

Only ``StoreUnavailable`` counts as a store failure: a cancelled call (a client that went
away) does not, nor does any other error (a record that cannot be parsed is a data error of
one namespace, and must not cut every namespace off the store). Outcomes of calls that
were already in flight when the circuit opened are not counted: only the probe decides.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from kv_export.errors import StoreUnavailable
from lookup.errors import CircuitOpen

T = TypeVar("T")
State = Literal["closed", "half-opened", "opened"]
CLOSED: State = "closed"
HALF_OPEN: State = "half-opened"
OPEN: State = "opened"


class Admission(enum.Enum):
    """What to do with a call: make it, refuse it, or refuse it and start the probe."""

    CALL = "call"
    REFUSE = "refuse"
    PROBE = "probe"


@dataclass
class Circuit:
    """The breaker's states and transitions, with no I/O and no clock: every event that
    depends on time is given ``now`` (any monotonic clock, in seconds).

    closed --``threshold`` consecutive failures--> opened --``reset_seconds``, one call
    admitted as the probe--> half-opened --probe succeeded--> closed, or --probe failed-->
    opened again from then. While half-opened every call is refused, so there is one
    probe at a time; a probe abandoned (cancelled) leaves the circuit open and due.
    """

    threshold: int
    reset_seconds: float
    state: State = CLOSED
    failures: int = 0  # consecutive failures counted while closed
    opened_at: float = 0.0

    def admit(self, now: float) -> Admission:
        if self.state == CLOSED:
            return Admission.CALL
        if self.state == OPEN and now >= self.opened_at + self.reset_seconds:
            self.state = HALF_OPEN
            return Admission.PROBE
        return Admission.REFUSE

    def call_failed(self, now: float) -> None:
        if self.state != CLOSED:
            return  # a call from before the circuit opened: only the probe decides now
        self.failures += 1
        if self.failures >= self.threshold:
            self._open(now)

    def call_succeeded(self) -> None:
        if self.state == CLOSED:
            self.failures = 0

    def probe_succeeded(self) -> None:
        if self.state == HALF_OPEN:
            self.state, self.failures = CLOSED, 0

    def probe_failed(self, now: float) -> None:
        if self.state == HALF_OPEN:
            self._open(now)

    def probe_abandoned(self) -> None:
        if self.state == HALF_OPEN:
            self.state = OPEN  # ``opened_at`` kept: the next call probes again

    def _open(self, now: float) -> None:
        self.state, self.failures, self.opened_at = OPEN, 0, now


class StoreBreaker:
    """``Circuit`` driven by store calls, with the probe run as a background task."""

    def __init__(
        self,
        failures: int,
        reset_seconds: float,
        probe: Callable[[], Awaitable[object]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.circuit = Circuit(failures, reset_seconds)
        self._probe = probe
        self._clock = clock
        self._probing: asyncio.Task[None] | None = None  # held: the loop keeps weak refs

    async def call(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        """``function(*args)`` if the circuit is closed; ``CircuitOpen`` at once otherwise."""
        if self.refuses():
            raise CircuitOpen()
        try:
            result = await function(*args)
        except StoreUnavailable:
            self.failed()
            raise
        if self.circuit.failures:
            self.succeeded()
        return result

    def refuses(self) -> bool:
        """The circuit is not closed: a call would fail with ``CircuitOpen`` (and this starts
        the background probe when one is due). A check for the hot path, without raising."""
        circuit = self.circuit
        if circuit.state == CLOSED:
            return False
        if circuit.admit(self._clock()) is Admission.PROBE:
            self._probing = asyncio.get_running_loop().create_task(self._run_probe())
        return True

    def failed(self) -> None:
        """Count a store call that raised ``StoreUnavailable``, as ``call`` does: for a caller
        that made the call itself after ``refuses()`` said no."""
        self.circuit.call_failed(self._clock())

    def recovering(self) -> bool:
        """Failures were counted since the last success: the next success must reset them
        (``succeeded``). False on the hot path."""
        return bool(self.circuit.failures)

    def succeeded(self) -> None:
        """Count a store call that succeeded, as ``call`` does."""
        self.circuit.call_succeeded()

    async def _run_probe(self) -> None:
        try:
            await self._probe()
        except asyncio.CancelledError:
            self.circuit.probe_abandoned()
            raise
        except Exception:  # any failure of the probe: the circuit stays open another while
            self.circuit.probe_failed(self._clock())
        else:
            self.circuit.probe_succeeded()
        finally:
            self._probing = None

    @property
    def state(self) -> State:
        """'closed', 'half-opened' or 'opened' (the names the metrics label)."""
        return self.circuit.state
