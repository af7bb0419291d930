"""The namespace state (live pointer and version records) cached in the process.

Invariants:

- A request never waits for the state read except the first one for a
  namespace: after ``ttl`` seconds the cached state is still served and one
  background refresh is started (single flight per namespace), so a publish
  is seen within about ``ttl`` plus one round trip.
- When a refresh fails the last state read stays in use; that is what lets the
  batch fallback find the live run's output while the store is down, and what keeps
  a namespace answering when its state record turns unreadable (logged).
- Namespaces with a live version and namespaces without one ("unknown", cached
  so that probing random names cannot hammer the store) are kept apart, at most
  ``max_namespaces`` of each, oldest first out. An unknown name never pushes a
  live namespace out: probing cannot make the API forget the state that the
  batch fallback needs in an outage.
- Everything runs on the event loop thread: no locks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kv_export.errors import StoreUnavailable
from kv_export.store import NamespaceState
from lookup.errors import NamespaceStateInvalid

log = logging.getLogger("batchscore.lookup")

ReadState = Callable[[str], Awaitable[NamespaceState]]
OnChange = Callable[[str, NamespaceState], None]


@dataclass
class Entry:
    fetched: float
    state: NamespaceState
    read_at: float  # when the read of ``state`` was started (monotonic)


class LiveCache:
    def __init__(
        self,
        read: ReadState,
        ttl: float,
        on_change: OnChange | None = None,
        max_namespaces: int = 10_000,
    ) -> None:
        self._read = read
        self._ttl = ttl
        self._on_change = on_change
        self._max = max_namespaces
        self._entries: dict[str, Entry] = {}  # namespaces with a live version
        self._unknown: dict[str, Entry] = {}  # read, and found without one
        self._inflight: dict[str, asyncio.Task[NamespaceState]] = {}
        self._inflight_since: dict[str, float] = {}  # when each refresh in flight started

    async def state(self, namespace: str) -> NamespaceState:
        """The namespace's state; raises ``StoreUnavailable`` only if it was never read."""
        return self.current(namespace) or await self._refresh(namespace)

    def current(self, namespace: str) -> NamespaceState | None:
        """The cached state without waiting (a refresh is started when it is due), or None
        if the namespace was never read: the hot path's check, no coroutine needed."""
        entry = self._entries.get(namespace) or self._unknown.get(namespace)
        if entry is None:
            return None
        if time.monotonic() - entry.fetched >= self._ttl:
            self._refresh(namespace)
        return entry.state

    def cached(self) -> dict[str, NamespaceState]:
        """The namespaces known to have a live version, and their states."""
        return {ns: entry.state for ns, entry in self._entries.items()}

    async def fresh(self, namespace: str, since: float) -> NamespaceState:
        """The state as read by a read started at or after ``since`` (``time.monotonic()``):
        what a lookup that just missed must see before it may say "not found", since the
        version it read may have been replaced and deleted after its state was cached.
        Lookups missing together share one read; one started before ``since`` is waited
        out, not trusted. If the store cannot be read the cached state is returned."""
        while True:
            entry = self._entries.get(namespace) or self._unknown.get(namespace)
            if entry is not None and entry.read_at >= since:
                return entry.state
            task = self._inflight.get(namespace)
            if task is None or self._inflight_since[namespace] >= since:
                return await asyncio.shield(self._refresh(namespace))
            await asyncio.wait([task])  # read before ``since``: then read again

    def _refresh(self, namespace: str) -> asyncio.Task[NamespaceState]:
        task = self._inflight.get(namespace)
        if task is None:
            self._inflight_since[namespace] = time.monotonic()
            task = asyncio.get_running_loop().create_task(self._fetch(namespace))
            self._inflight[namespace] = task
            task.add_done_callback(lambda t: self._done(namespace, t))
        return task

    def _done(self, namespace: str, task: asyncio.Task[NamespaceState]) -> None:
        self._inflight.pop(namespace, None)
        self._inflight_since.pop(namespace, None)
        if not task.cancelled():
            task.exception()  # retrieved here; whoever awaited it got it too

    async def _fetch(self, namespace: str) -> NamespaceState:
        previous = self._entries.get(namespace) or self._unknown.get(namespace)
        started = time.monotonic()
        try:
            state = await self._read(namespace)
        except (StoreUnavailable, NamespaceStateInvalid) as exc:
            if previous is None:
                raise
            previous.fetched = time.monotonic()  # try again after another ttl
            log.debug("keeping the cached state of %s: %s", namespace, exc)
            return previous.state
        self._keep(namespace, Entry(time.monotonic(), state, started))
        if self._on_change and (previous is None or previous.state.live != state.live):
            self._on_change(namespace, state)
        return state

    def _keep(self, namespace: str, entry: Entry) -> None:
        """File the entry with its kind, out of the other; each kind bounded on its own."""
        kind, other = (
            (self._entries, self._unknown)
            if entry.state.live is not None
            else (self._unknown, self._entries)
        )
        other.pop(namespace, None)
        if namespace not in kind and len(kind) >= self._max:
            kind.pop(next(iter(kind)))
        kind[namespace] = entry
