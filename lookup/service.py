"""The fallback chain: KV live version → the live run's batch output → (optionally) the
previous published version, marked stale → not found.

Invariants:

- One store round trip per request for the live version (a multi-get for a
  batch); the namespace state comes from ``LiveCache``, never per request.
- Every answer names the version it came from (number, model, run, scored_at), its
  ``source`` and whether the key is in a canary's share; an answer from another version
  than the one the key is routed to is ``stale``.
- During a canary (``NamespaceState.canary``) each key is looked up in the version the
  namespace's rule gives it (``Canary.takes``), and every fallback keeps to that
  version: the batch fallback reads that version's parts, the stale fallback the version
  before it (the live one for a canary key).
- The store is only called through the circuit breaker (``breaker.call``, or for a
  single key its check and accounting unrolled in ``find_one``), so a dead store costs
  nothing per request while the breaker is open.
- The batch fallback is used only when the store fails, never for keys the live
  version simply lacks (those go to the stale fallback, if enabled, or 404).
- A key is "not found" only in the version that is live at the time of the miss:
  a miss in the store makes the namespace state be read again (``LiveCache.fresh``)
  and, if the live version changed meanwhile (a publish, possibly deleting the
  version read), the lookup is made once more in the new live version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

from batchscore.core.settings import ApiSettings
from kv_export.errors import StoreUnavailable
from kv_export.store import AsyncPredictionReader, NamespaceState, VersionInfo
from lookup.breaker import StoreBreaker
from lookup.errors import ApiError, CircuitOpen, NamespaceStateInvalid
from lookup.fallback import BatchFallback
from lookup.live import LiveCache
from lookup.observability import Metrics
from lookup.readers import single_key_read
from lookup.schemas import Source

log = logging.getLogger("batchscore.lookup")


class Answer(NamedTuple):  # a tuple: built for every key looked up
    value: bytes
    info: VersionInfo
    source: Source
    stale: bool
    canary: bool  # the key is in a canary's share (``info`` is the canary, or before it)


class Miss(NamedTuple):
    """A key its version lacks: the version it was looked up in (one ``Miss`` per version
    of a request, shared by its keys), where that was read, and whether it is the canary."""

    info: VersionInfo
    source: Source
    canary: bool


class Lookup:
    def __init__(
        self, settings: ApiSettings, reader: AsyncPredictionReader, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.reader = reader
        self._get_one = single_key_read(reader)
        self.metrics = metrics
        self.breaker = StoreBreaker(
            settings.breaker_failures, settings.breaker_reset_seconds, probe=reader.ping
        )
        self.batch = BatchFallback(
            settings.fallback_cache_row_groups, settings.fallback_memory_bytes
        )
        self.cache = LiveCache(self._read_state, settings.live_cache_seconds, self._new_live)
        self._background: set[asyncio.Task[object]] = set()

    async def _read_state(self, namespace: str) -> NamespaceState:
        try:
            return await self.breaker.call(self.reader.state, namespace)
        except ValueError as exc:  # the reader's "cannot parse" (pydantic, UTF-8, type)
            found = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("namespace %s has a state that cannot be read: %s", namespace, found)
            raise NamespaceStateInvalid(namespace, found) from None

    def _new_live(self, namespace: str, state: NamespaceState) -> None:
        """Build the batch index of a newly seen live version ahead of any outage."""
        info = state.live_info()
        if self.settings.batch_fallback and info is not None and self.batch.available(info):
            task = asyncio.get_running_loop().create_task(self._prebuild(namespace, info))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _prebuild(self, namespace: str, info: VersionInfo) -> None:
        try:
            await self.batch.index(namespace, info)
        except Exception as exc:  # an unreadable part must not take the API down
            log.warning(
                "cannot index the batch output of %s v%s: %s",
                namespace,
                info.version,
                type(exc).__name__,
            )

    async def warm(self) -> None:
        """Read every namespace's state once at startup; neither a dead store nor a namespace
        whose state cannot be read is fatal here (that namespace's requests fail alone)."""
        try:
            names = await self.breaker.call(self.reader.namespaces)
        except StoreUnavailable as exc:
            log.warning("store unavailable at startup: %s", exc.what)
            return
        read = await asyncio.gather(
            *(self.cache.state(n) for n in names[:1000]), return_exceptions=True
        )
        failed = [r for r in read if isinstance(r, BaseException)]
        if any(isinstance(r, StoreUnavailable) for r in failed):
            log.warning("store unavailable at startup: some namespaces were not read")
        for error in failed:
            if not isinstance(error, (StoreUnavailable, NamespaceStateInvalid)):
                raise error

    async def state(self, namespace: str) -> NamespaceState:
        try:
            return await self.cache.state(namespace)
        except StoreUnavailable:
            self.metrics.errors.labels("store_unavailable").inc()
            raise ApiError(
                503,
                "store_unavailable",
                "The prediction store is unavailable and "
                "no live version of this namespace is known",
            ) from None

    async def find(
        self, namespace: str, keys: Sequence[str], *, retry: bool = True
    ) -> tuple[Source, list[Answer | Miss]]:
        """Where the live version was read from, and one answer (or miss) per key, each from
        the version the namespace's rule gives that key (the live one, or the canary's
        share): during a canary the keys of the two versions are read concurrently, one
        multi-get each, which the store's reader sends together."""
        state = self.cache.current(namespace) or await self.state(namespace)
        live = _live_info(namespace, state)
        canary = state.canary
        if canary is None:
            groups = [(live, False, list(range(len(keys))))]
        else:
            groups = self._split(state, live, keys)
        try:
            read = await asyncio.gather(
                *(self._read(namespace, g[0], [keys[i] for i in g[2]]) for g in groups)
            )
        except ApiError:
            for info, is_canary, where in groups:
                self.metrics.answered(namespace, info.version, is_canary, "error", len(where))
            raise
        if retry and any(source == "kv" and None in values for values, source in read):
            if await self._replaced(namespace, state):
                return await self.find(namespace, keys, retry=False)
        answers: list[Answer | Miss] = []
        for (info, is_canary, where), (values, source) in zip(groups, read, strict=True):
            miss = Miss(info, source, is_canary)
            mine = [
                Answer(v, info, source, False, is_canary) if v is not None else miss for v in values
            ]
            if len(groups) == 1:
                answers = mine
            else:
                answers = answers or [miss] * len(keys)
                for i, answer in zip(where, mine, strict=True):
                    answers[i] = answer
            missing = values.count(None)
            self.metrics.answered(namespace, info.version, is_canary, "found", len(where) - missing)
            if missing:
                self.metrics.answered(namespace, info.version, is_canary, "not_found", missing)
        if self.settings.stale_fallback and any(type(a) is Miss for a in answers):
            await self._fill_stale(namespace, state, keys, answers)
        return read[0][1], answers

    @staticmethod
    def _split(
        state: NamespaceState, live: VersionInfo, keys: Sequence[str]
    ) -> list[tuple[VersionInfo, bool, list[int]]]:
        """The keys' positions by the version the rule gives them: the live version's, and
        the canary's when it takes any."""
        canary = state.canary_info()
        assert state.canary is not None and canary is not None
        takes = state.canary.takes
        mine: list[int] = []
        theirs: list[int] = []
        for i, key in enumerate(keys):
            (theirs if takes(key.encode()) else mine).append(i)
        groups = [(live, False, mine)]
        if theirs:
            groups.append((canary, True, theirs))
        return groups

    async def find_one(
        self, namespace: str, key: str, *, retry: bool = True
    ) -> tuple[VersionInfo, Source, Answer | None]:
        """``find`` for one key, the hot route: the same answer through the same chain, with
        no lists and the store's reply awaited through the reader's ``get_one`` (see
        ``SingleKeyReader``), not ``get_many``'s coroutine. ``VersionInfo`` is the version
        the key was looked up in: the live one, or the canary for a key in its share."""
        state = self.cache.current(namespace) or await self.state(namespace)
        info = _live_info(namespace, state)
        raw = key.encode()
        is_canary = False
        if state.canary is not None and state.canary.takes(raw):
            info, is_canary = state.versions[state.canary.version], True
        value: bytes | None
        source: Source = "kv"
        try:
            if self.breaker.refuses():  # as in ``_read``
                value, source = await self._one_from_batch(namespace, info, key, "circuit_open")
            else:
                # ``breaker.call`` unrolled: the circuit is closed (just checked, nothing
                # awaited since), so the read goes straight out and only its outcome is
                # counted; one coroutine layer fewer to create and to resume through when
                # the reply comes.
                try:
                    value = await self._get_one(namespace, info, raw)
                except StoreUnavailable:
                    self.breaker.failed()
                    value, source = await self._one_from_batch(namespace, info, key, "store_error")
                else:
                    if self.breaker.circuit.failures:  # as ``breaker.call`` does
                        self.breaker.succeeded()
        except ApiError:
            self.metrics.answered(namespace, info.version, is_canary, "error")
            raise
        if value is not None:
            self.metrics.answered(namespace, info.version, is_canary, "found")
            return info, source, Answer(value, info, source, False, is_canary)
        if retry and source == "kv" and await self._replaced(namespace, state):
            return await self.find_one(namespace, key, retry=False)
        self.metrics.answered(namespace, info.version, is_canary, "not_found")
        if self.settings.stale_fallback:
            answers: list[Answer | Miss] = [Miss(info, source, is_canary)]
            await self._fill_stale(namespace, state, (key,), answers)
            found = answers[0]
            return info, source, found if type(found) is Answer else None
        return info, source, None

    async def _replaced(self, namespace: str, before: NamespaceState) -> bool:
        """After a miss: the namespace state read now routes keys otherwise than ``before``
        (another live version, another canary or share) or no longer has a version that
        was read (the cache then holds the new state)."""
        since = time.monotonic()
        try:
            state = await self.cache.fresh(namespace, since)
        except (StoreUnavailable, NamespaceStateInvalid):
            return False
        read = [before.live] + ([before.canary.version] if before.canary else [])
        return _routing(state) != _routing(before) or any(v not in state.versions for v in read)

    async def _read(
        self, namespace: str, info: VersionInfo, keys: Sequence[str]
    ) -> tuple[list[bytes | None], Source]:
        if self.breaker.refuses():  # open: no store call, no exception raised and caught
            return await self._from_batch(namespace, info, keys, "circuit_open"), "batch"
        try:
            raw = [k.encode() for k in keys]
            return await self.breaker.call(self.reader.get_many, namespace, info, raw), "kv"
        except StoreUnavailable as exc:
            return await self._from_batch(namespace, info, keys, _reason(exc)), "batch"

    async def _one_from_batch(
        self, namespace: str, info: VersionInfo, key: str, reason: str
    ) -> tuple[bytes | None, Source]:
        (value,) = await self._from_batch(namespace, info, (key,), reason)
        return value, "batch"

    async def _from_batch(
        self, namespace: str, info: VersionInfo, keys: Sequence[str], reason: str
    ) -> list[bytes | None]:
        if not self.settings.batch_fallback or not self.batch.available(info):
            self.metrics.errors.labels("store_unavailable").inc()
            raise ApiError(503, "store_unavailable", "The prediction store is unavailable")
        try:
            values = await self.batch.get_many(namespace, info, keys)
        except (OSError, ValueError, KeyError) as exc:
            log.warning(
                "batch output of %s v%s unreadable: %s", namespace, info.version, type(exc).__name__
            )
            self.metrics.errors.labels("fallback_unavailable").inc()
            raise ApiError(
                503,
                "store_unavailable",
                "The prediction store and the batch output are unavailable",
            ) from None
        self.metrics.fallback("batch", reason)
        return values

    async def _fill_stale(
        self,
        namespace: str,
        state: NamespaceState,
        keys: Sequence[str],
        answers: list[Answer | Miss],
    ) -> None:
        """Answer keys their version lacks from the version before it: the previous
        published version for the live version's keys, the live version for the canary's."""
        previous = state.versions.get(state.history[-2]) if len(state.history) >= 2 else None
        for is_canary in (False, True):
            before = state.live_info() if is_canary else previous
            todo = [i for i, a in enumerate(answers) if type(a) is Miss and a.canary is is_canary]
            if before is None or before.state != "complete" or not todo:
                continue
            try:
                values, source = await self._read(namespace, before, [keys[i] for i in todo])
            except ApiError:
                continue
            for i, value in zip(todo, values, strict=True):
                if value is not None:
                    answers[i] = Answer(value, before, source, True, is_canary)
                    self.metrics.fallback("stale", source)

    async def ready(self) -> dict[str, str]:
        """Ready when the store answers, or when a batch fallback can answer instead."""
        try:
            await self.breaker.call(self.reader.ping)
            return {"status": "ready", "store": "up"}
        except StoreUnavailable:
            pass
        if self.settings.batch_fallback and any(
            info is not None and self.batch.available(info)
            for info in (s.live_info() for s in self.cache.cached().values())
        ):
            return {"status": "degraded", "store": "down", "fallback": "batch"}
        raise ApiError(503, "not_ready", "The store is unreachable and no fallback is available")


def _live_info(namespace: str, state: NamespaceState) -> VersionInfo:
    info = state.live_info()
    if info is None:
        raise ApiError(404, "namespace_not_found", f"Namespace '{namespace}' has no live version")
    return info


def _routing(state: NamespaceState) -> tuple[int | None, int | None, float | None]:
    """What decides which version answers a key: the live version and the canary."""
    canary = state.canary
    return state.live, canary.version if canary else None, canary.percent if canary else None


def _reason(exc: StoreUnavailable) -> str:
    """The fallback metric's reason for a failed store call."""
    return "circuit_open" if isinstance(exc, CircuitOpen) else "store_error"
