"""The circuit breaker: the pure state machine with time given, then its asyncio shell with
an injected clock (no sleeps: the shell's probe is awaited through the event loop)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine

import pytest

from kv_export.errors import StoreUnavailable
from lookup.breaker import CLOSED, HALF_OPEN, OPEN, Admission, Circuit, StoreBreaker
from lookup.errors import CircuitOpen

# The pure state machine ------------------------------------------------------------------


def opened(threshold: int = 3, reset: float = 2.0, at: float = 100.0) -> Circuit:
    circuit = Circuit(threshold, reset)
    for _ in range(threshold):
        circuit.call_failed(at)
    assert circuit.state == OPEN
    return circuit


def test_closed_admits_every_call() -> None:
    circuit = Circuit(3, 2.0)
    assert [circuit.admit(t) for t in (0.0, 1e9)] == [Admission.CALL, Admission.CALL]


def test_it_opens_after_threshold_consecutive_failures_and_not_before() -> None:
    circuit = Circuit(3, 2.0)
    circuit.call_failed(1.0)
    circuit.call_failed(2.0)
    assert circuit.state == CLOSED and circuit.failures == 2
    circuit.call_failed(3.0)
    assert circuit.state == OPEN and circuit.opened_at == 3.0


def test_a_success_resets_the_count_so_failures_must_be_consecutive() -> None:
    circuit = Circuit(3, 2.0)
    for _ in range(5):
        circuit.call_failed(1.0)
        circuit.call_failed(1.0)
        circuit.call_succeeded()
    assert circuit.state == CLOSED and circuit.failures == 0


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    circuit = Circuit(1, 2.0)
    circuit.call_failed(5.0)
    assert circuit.state == OPEN


def test_open_refuses_until_the_reset_timeout_then_admits_one_probe() -> None:
    circuit = opened(reset=2.0, at=100.0)
    assert circuit.admit(100.0) is Admission.REFUSE
    assert circuit.admit(101.999) is Admission.REFUSE
    assert circuit.admit(102.0) is Admission.PROBE
    assert circuit.state == HALF_OPEN
    # one probe at a time: every later call is refused while it runs, however late
    assert [circuit.admit(t) for t in (102.0, 103.0, 1e6)] == [Admission.REFUSE] * 3


def test_a_successful_probe_closes_the_circuit_with_no_failure_counted() -> None:
    circuit = opened()
    assert circuit.admit(200.0) is Admission.PROBE
    circuit.probe_succeeded()
    assert circuit.state == CLOSED and circuit.failures == 0
    assert circuit.admit(200.0) is Admission.CALL


def test_a_failed_probe_opens_the_circuit_for_another_reset_timeout() -> None:
    circuit = opened(reset=2.0, at=100.0)
    assert circuit.admit(105.0) is Admission.PROBE
    circuit.probe_failed(106.0)
    assert circuit.state == OPEN and circuit.opened_at == 106.0
    assert circuit.admit(107.9) is Admission.REFUSE
    assert circuit.admit(108.0) is Admission.PROBE


def test_an_abandoned_probe_leaves_the_circuit_open_and_due() -> None:
    circuit = opened(reset=2.0, at=100.0)
    assert circuit.admit(102.5) is Admission.PROBE
    circuit.probe_abandoned()
    assert circuit.state == OPEN and circuit.opened_at == 100.0
    assert circuit.admit(102.5) is Admission.PROBE


def test_only_the_probe_decides_once_the_circuit_is_not_closed() -> None:
    """Outcomes of calls that were in flight when the circuit opened count for nothing."""
    circuit = opened(at=100.0)
    circuit.call_succeeded()
    circuit.call_failed(101.0)
    assert circuit.state == OPEN and circuit.opened_at == 100.0
    assert circuit.admit(102.0) is Admission.PROBE
    circuit.call_succeeded()
    circuit.call_failed(102.5)
    assert circuit.state == HALF_OPEN


def test_probe_outcomes_outside_half_open_change_nothing() -> None:
    circuit = Circuit(2, 1.0)
    circuit.call_failed(1.0)
    circuit.probe_succeeded()
    circuit.probe_failed(1.0)
    circuit.probe_abandoned()
    assert circuit.state == CLOSED and circuit.failures == 1


def test_after_closing_it_takes_threshold_failures_again_to_open() -> None:
    circuit = opened(threshold=2)
    circuit.admit(1e3)
    circuit.probe_succeeded()
    circuit.call_failed(1e3)
    assert circuit.state == CLOSED
    circuit.call_failed(1e3)
    assert circuit.state == OPEN


# The asyncio shell -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """A store whose calls and PINGs succeed or fail as the test says, counting each."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.pings = 0
        self.ping_gate: asyncio.Future[None] | None = None

    async def get(self, value: str) -> str:
        self.calls += 1
        if not self.up:
            raise StoreUnavailable("the store did not answer")
        return value

    async def ping(self) -> None:
        self.pings += 1
        if self.ping_gate is not None:
            await self.ping_gate
        if not self.up:
            raise StoreUnavailable("the store did not answer the PING")


def in_loop(test: Callable[[], Coroutine[object, object, None]]) -> Callable[[], None]:
    """Run the async test in a new event loop."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run tasks until ``condition`` holds (no time passes)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not met")


async def open_breaker(store: Store, clock: Clock, failures: int = 2) -> StoreBreaker:
    breaker = StoreBreaker(failures, 2.0, store.ping, clock)
    for _ in range(failures):
        with pytest.raises(StoreUnavailable) as raised:
            await breaker.call(store.get, "x")
        assert not isinstance(raised.value, CircuitOpen)
    assert breaker.state == OPEN
    return breaker


@in_loop
async def test_while_open_calls_fail_at_once_and_never_reach_the_store() -> None:
    store, clock = Store(), Clock()
    breaker = await open_breaker(store, clock)
    store.up = True
    for _ in range(5):
        with pytest.raises(CircuitOpen):
            await breaker.call(store.get, "x")
        assert breaker.refuses()
    assert store.calls == 2 and store.pings == 0


@in_loop
async def test_the_probe_runs_in_the_background_and_its_success_closes() -> None:
    store, clock = Store(), Clock()
    breaker = await open_breaker(store, clock)
    store.up = True
    store.ping_gate = asyncio.get_running_loop().create_future()
    clock.now += 2.0
    with pytest.raises(CircuitOpen):  # the call that starts the probe does not wait for it
        await breaker.call(store.get, "x")
    await until(lambda: store.pings == 1)
    assert breaker.state == HALF_OPEN
    for _ in range(3):  # the probe is still out: no second one, no call to the store
        assert breaker.refuses()
    assert store.pings == 1 and store.calls == 2
    store.ping_gate.set_result(None)
    await until(lambda: breaker.state == CLOSED)
    assert await breaker.call(store.get, "y") == "y"
    assert store.calls == 3


@in_loop
async def test_a_failed_probe_keeps_the_circuit_open_for_another_reset() -> None:
    store, clock = Store(), Clock()
    breaker = await open_breaker(store, clock)
    clock.now += 2.0
    assert breaker.refuses()
    await until(lambda: breaker.state == OPEN)
    assert store.pings == 1 and breaker.circuit.opened_at == clock.now
    clock.now += 1.0
    assert breaker.refuses()
    assert store.pings == 1  # not due yet
    clock.now += 1.0
    assert breaker.refuses()
    await until(lambda: store.pings == 2)


@in_loop
async def test_a_cancelled_probe_leaves_the_circuit_open_and_due() -> None:
    store, clock = Store(), Clock()
    breaker = await open_breaker(store, clock)
    store.ping_gate = asyncio.get_running_loop().create_future()
    clock.now += 2.0
    assert breaker.refuses()
    await until(lambda: store.pings == 1)
    store.ping_gate.cancel()
    await until(lambda: breaker.state == OPEN)
    store.ping_gate, store.up = None, True
    assert breaker.refuses()  # due at once: a new probe
    await until(lambda: breaker.state == CLOSED)
    assert store.pings == 2


@in_loop
async def test_only_store_unavailable_counts_as_a_failure() -> None:
    store, clock = Store(), Clock()
    breaker = StoreBreaker(1, 2.0, store.ping, clock)

    async def bad_record() -> None:
        raise ValueError("cannot parse")

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(ValueError):
        await breaker.call(bad_record)
    with pytest.raises(asyncio.CancelledError):
        await breaker.call(cancelled)
    assert breaker.state == CLOSED and not breaker.recovering()


@in_loop
async def test_a_success_after_failures_resets_the_count() -> None:
    store, clock = Store(), Clock()
    breaker = StoreBreaker(2, 2.0, store.ping, clock)
    with pytest.raises(StoreUnavailable):
        await breaker.call(store.get, "x")
    assert breaker.recovering()
    store.up = True
    assert await breaker.call(store.get, "x") == "x"
    assert not breaker.recovering()
    store.up = False
    with pytest.raises(StoreUnavailable):
        await breaker.call(store.get, "x")
    assert breaker.state == CLOSED


@in_loop
async def test_a_caller_that_calls_the_store_itself_is_counted_the_same() -> None:
    """``refuses`` / ``failed`` / ``succeeded``: the hot path's unrolled ``call``."""
    store, clock = Store(), Clock()
    breaker = StoreBreaker(2, 2.0, store.ping, clock)
    assert not breaker.refuses()
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    assert breaker.state == CLOSED
    breaker.failed()
    assert breaker.state == OPEN and breaker.refuses()
