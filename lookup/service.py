"""The fallback chain: KV live version → the live run's batch output → (optionally) the
previous published version, marked stale → not found.

Invariants:

- One store round trip per request for the live version (a multi-get for a
  batch); the namespace state comes from ``LiveCache``, never per request.
- Every answer names the version it came from (model, run, scored_at) and its
  ``source``; an answer from another version than the live one is ``stale``.
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
    ) -> tuple[VersionInfo, Source, list[Answer | None]]:
        """The live version, where it was read from, and one answer (or None) per key."""
        state = self.cache.current(namespace) or await self.state(namespace)
        info = _live_info(namespace, state)
        values, source = await self._read(namespace, info, keys)
        if retry and source == "kv" and None in values and await self._replaced(namespace, info):
            return await self.find(namespace, keys, retry=False)
        answers = [Answer(v, info, source, False) if v is not None else None for v in values]
        if self.settings.stale_fallback and None in values:
            await self._fill_stale(namespace, state, keys, answers)
        return info, source, answers

    async def find_one(
        self, namespace: str, key: str, *, retry: bool = True
    ) -> tuple[VersionInfo, Source, Answer | None]:
        """``find`` for one key, the hot route: the same answer through the same chain, with
        no lists and the store's reply awaited through the reader's ``get_one`` (see
        ``SingleKeyReader``), not ``get_many``'s coroutine."""
        state = self.cache.current(namespace) or await self.state(namespace)
        info = _live_info(namespace, state)
        value: bytes | None
        source: Source = "kv"
        if self.breaker.refuses():  # as in ``_read``
            value, source = await self._one_from_batch(namespace, info, key, "circuit_open")
        else:
            # ``breaker.call`` unrolled: the circuit is closed (just checked, nothing awaited
            # since), so the read goes straight out and only its outcome is counted; one
            # coroutine layer fewer to create and to resume through when the reply comes.
            try:
                value = await self._get_one(namespace, info, key.encode())
            except StoreUnavailable:
                self.breaker.failed()
                value, source = await self._one_from_batch(namespace, info, key, "store_error")
            else:
                self.breaker.succeeded()
        if value is not None:
            return info, source, Answer(value, info, source, False)
        if retry and source == "kv" and await self._replaced(namespace, info):
            return await self.find_one(namespace, key, retry=False)
        if self.settings.stale_fallback:
            answers: list[Answer | None] = [None]
            await self._fill_stale(namespace, state, (key,), answers)
            return info, source, answers[0]
        return info, source, None

    async def _replaced(self, namespace: str, info: VersionInfo) -> bool:
        """After a miss in ``info``: the namespace state read now has another live version,
        or no longer has ``info`` (the cache then holds the new state)."""
        since = time.monotonic()
        try:
            state = await self.cache.fresh(namespace, since)
        except (StoreUnavailable, NamespaceStateInvalid):
            return False
        return state.live != info.version or info.version not in state.versions

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
        answers: list[Answer | None],
    ) -> None:
        """Answer keys the live version lacks from the previous published version."""
        previous = state.versions.get(state.history[-2]) if len(state.history) >= 2 else None
        if previous is None or previous.state != "complete":
            return
        todo = [i for i, a in enumerate(answers) if a is None]
        try:
            values, source = await self._read(namespace, previous, [keys[i] for i in todo])
        except ApiError:
            return
        for i, value in zip(todo, values, strict=True):
            if value is not None:
                answers[i] = Answer(value, previous, source, True)
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


def _reason(exc: StoreUnavailable) -> str:
    """The fallback metric's reason for a failed store call."""
    return "circuit_open" if isinstance(exc, CircuitOpen) else "store_error"
