"""Prometheus metrics (one registry per app) and the JSON-lines access log.

The ASGI middleware here is the only place that times requests: it labels the
latency histogram with the matched route template (bounded cardinality, never
the raw path) and the answer's ``source`` (``kv``, ``batch``, ``stale``,
``none``), which handlers leave in ``request.state.source``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kv_export.store import NamespaceState

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "batchscore_lookup_request_seconds",
            "Request latency by route and answer source.",
            ["route", "source"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "batchscore_lookup_responses",
            "Responses by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "batchscore_lookup_fallbacks",
            "Lookups answered by a fallback, by fallback and reason.",
            ["fallback", "reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "batchscore_lookup_errors", "Error answers by code.", ["code"], registry=self.registry
        )
        self._fallback_counts: dict[tuple[str, str], Callable[[], None]] = {}

    def fallback(self, fallback: str, reason: str) -> None:
        """Count one lookup answered by a fallback (the labelled child is looked up once)."""
        count = self._fallback_counts.get((fallback, reason))
        if count is None:
            count = self.fallbacks.labels(fallback, reason).inc
            self._fallback_counts[(fallback, reason)] = count
        count()


class StateCollector(Collector):
    """Breaker state and the live version's age per namespace, computed at scrape time."""

    def __init__(
        self, breaker_state: Callable[[], str], states: Callable[[], dict[str, NamespaceState]]
    ) -> None:
        self._breaker_state = breaker_state
        self._states = states

    def collect(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "batchscore_store_circuit_state",
            "Store circuit breaker: 1 for the current state.",
            labels=["state"],
        )
        current = self._breaker_state()
        for state in ("closed", "half-opened", "opened"):
            breaker.add_metric([state], 1.0 if state == current else 0.0)
        yield breaker
        age = GaugeMetricFamily(
            "batchscore_live_version_age_seconds",
            "Seconds since the live version of a namespace was published.",
            labels=["namespace"],
        )
        version = GaugeMetricFamily(
            "batchscore_live_version",
            "The live version number of a namespace.",
            labels=["namespace"],
        )
        now = datetime.now(UTC)
        for namespace, namespace_state in sorted(self._states().items()):
            info = namespace_state.live_info()
            if info is None:
                continue
            version.add_metric([namespace], float(info.version))
            if info.published_at:
                published = datetime.fromisoformat(info.published_at)
                age.add_metric([namespace], (now - published).total_seconds())
        yield age
        yield version


class AccessLog:
    """JSON lines on stderr, one per request, written once per turn of the event loop.

    Through ``logging`` a line cost about 15 µs of the event loop (LogRecord,
    caller lookup, handler lock) plus one ``write`` syscall per request. Here a
    line is one ``orjson.dumps``; the lines of every request finished in the same
    loop turn go out in one write at the end of that turn (at once when idle), so
    a line is never held back longer than the requests being served.
    """

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._scheduled = False

    def write(self, entry: dict[str, Any]) -> None:
        self._lines.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines, self._lines = self._lines, []
        stream = self._stream or sys.stderr.buffer
        try:
            stream.write(b"".join(lines))
            stream.flush()
        except (OSError, ValueError):  # stderr closed or full: drop the lines, keep serving
            pass


class ObserveMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): times, counts and logs every request.

    The labelled children of the histogram and counter are looked up once per
    (route, source) / (route, status) and kept: ``labels()`` validates and locks
    on every call.
    """

    def __init__(self, app: Any, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self._observe: dict[tuple[str, str], Callable[[float], None]] = {}
        self._count: dict[tuple[str, int], Callable[[], None]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_see(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        state = scope.get("state") or {}
        source = state.get("source", "none")
        observe = self._observe.get((template, source))
        if observe is None:
            observe = self.metrics.latency.labels(template, source).observe
            self._observe[(template, source)] = observe
        observe(seconds)
        count = self._count.get((template, status))
        if count is None:
            count = self.metrics.responses.labels(template, str(status)).inc
            self._count[(template, status)] = count
        count()
        if self.access_log is not None:
            self.access_log.write(
                {
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "method": scope.get("method"),
                    "route": template,
                    "status": status,
                    "ms": round(seconds * 1000, 3),
                    "source": source,
                    "key_id": state.get("key_id"),
                    "client": (scope.get("client") or ("", 0))[0],
                }
            )
