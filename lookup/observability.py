"""Prometheus metrics (one registry per app) and the JSON-lines access log.

The ASGI middleware here is the only place that times requests: it labels the
latency histogram with the matched route template (bounded cardinality, never
the raw path) and the answer's ``source`` (``kv``, ``batch``, ``stale``,
``none``), which handlers leave in ``request.state.source``.

With several worker processes (``batchscore serve --workers N``) a scrape is
answered by one of them but must show the whole server, so the metrics use
prometheus_client's multiprocess mode: every process writes its values to its
own files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` merges the files of
all of them (``SharedCollector``). Counters and histograms are summed over the
processes, the dead ones included. A single process keeps plain in-memory
values (the mode is chosen by prometheus_client when it is first imported, from
that variable), with the same metric names and labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import BinaryIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchscore.core.errors import SettingsError
from kv_export.store import NamespaceState

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
BREAKER_STATES = ("closed", "half-opened", "opened")
BREAKER = "batchscore_store_circuit_state"
BREAKER_HELP = (
    "Store circuit breaker: 1 for the current state (several workers: how many are in it)."
)
VERSION = "batchscore_live_version"
VERSION_HELP = "The live version number of a namespace."
AGE = "batchscore_live_version_age_seconds"
AGE_HELP = "Seconds since the live version of a namespace was published."
PUBLISHED = "batchscore_live_version_published_unixtime"  # files only: /metrics shows AGE

BreakerState = Callable[[], str]
States = Callable[[], dict[str, NamespaceState]]


def shared_metrics_dir() -> str | None:
    """The folder of prometheus_client's multiprocess mode, or None for a single process.

    prometheus_client reads this variable itself when it is first imported (set at all,
    even empty, means multiprocess mode) and from then on keeps every value of the
    process in files there, so it is read here too (not a ``BATCHSCORE_`` setting):
    whatever prometheus_client does, the scrape must match.
    """
    if MULTIPROC_DIR not in os.environ:
        return None
    folder = os.environ[MULTIPROC_DIR]
    if not os.path.isdir(folder):
        raise SettingsError(
            f"{MULTIPROC_DIR}={folder!r} is not a folder",
            expected="an existing folder where the API's processes write their metrics "
            "(prometheus_client's multiprocess mode)",
            fix=f"create it, or unset {MULTIPROC_DIR}: batchscore serve --workers N makes a "
            "private one",
        )
    return folder


@contextlib.contextmanager
def shared_metrics_for_workers() -> Iterator[str]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the worker processes started inside.

    One the user set is used and left as found (prometheus_client's convention; clearing
    it between runs is theirs to do). Otherwise a new private folder (mode 0700) is
    made and removed on the way out, so counts never carry over from another run.
    """
    given = shared_metrics_dir()
    if given is not None:
        yield given
        return
    folder = tempfile.mkdtemp(prefix="batchscore-metrics-")
    os.environ[MULTIPROC_DIR] = folder
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(folder, ignore_errors=True)


class Metrics:
    """The API's metrics, and in ``registry`` what ``/metrics`` exposes.

    ``shared_dir`` (``shared_metrics_dir()``) selects multiprocess mode: the counters
    and the histogram are then registered nowhere (their values live in the files)
    and ``registry`` holds one ``SharedCollector`` that merges every process's files.
    """

    def __init__(self, shared_dir: str | None = None) -> None:
        self.shared_dir = shared_dir
        self.registry = CollectorRegistry(auto_describe=True)
        own = self.registry if shared_dir is None else None
        self.latency = Histogram(
            "batchscore_lookup_request_seconds",
            "Request latency by route and answer source.",
            ["route", "source"],
            buckets=BUCKETS,
            registry=own,
        )
        self.responses = Counter(
            "batchscore_lookup_responses",
            "Responses by route and status code.",
            ["route", "status"],
            registry=own,
        )
        self.fallbacks = Counter(
            "batchscore_lookup_fallbacks",
            "Lookups answered by a fallback, by fallback and reason.",
            ["fallback", "reason"],
            registry=own,
        )
        self.errors = Counter(
            "batchscore_lookup_errors", "Error answers by code.", ["code"], registry=own
        )
        self.answers = Counter(
            "batchscore_lookup_answers",
            "Keys answered, by namespace, the version looked up in, its role (live, or the "
            "canary for keys in a canary's share) and outcome (found, not_found, error).",
            ["namespace", "version", "role", "outcome"],
            registry=own,
        )
        self._fallback_counts: dict[tuple[str, str], Callable[[], None]] = {}
        self._answer_counts: dict[tuple[str, int, bool, str], Callable[[float], None]] = {}
        self._worker: WorkerState | None = None

    def watch(self, breaker_state: BreakerState, states: States) -> None:
        """Expose the breaker state and the live version (and its age) of each namespace:
        read at scrape time in a single process, through the files with several."""
        if self.shared_dir is None:
            self.registry.register(StateCollector(breaker_state, states))
            return
        self._worker = WorkerState(breaker_state, states)
        self.registry.register(SharedCollector(self.shared_dir, self._worker.write))

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """While the app serves. In multiprocess mode this worker writes its state every
        second, and on the way out removes its per-process gauges (``mark_process_dead``):
        a worker stopped gracefully (exit, ``SIGHUP`` restart, ``SIGTTOU``) counts no
        more. One that died without that is forgotten by the next scrape instead."""
        worker = self._worker
        if worker is None or self.shared_dir is None:
            yield
            return
        task = asyncio.get_running_loop().create_task(worker.keep_written())
        try:
            yield
        finally:
            task.cancel()
            mark_process_dead(os.getpid(), self.shared_dir)

    def fallback(self, fallback: str, reason: str) -> None:
        """Count one lookup answered by a fallback (the labelled child is looked up once)."""
        count = self._fallback_counts.get((fallback, reason))
        if count is None:
            count = self.fallbacks.labels(fallback, reason).inc
            self._fallback_counts[(fallback, reason)] = count
        count()

    def answered(
        self, namespace: str, version: int, canary: bool, outcome: str, keys: int = 1
    ) -> None:
        """Count ``keys`` keys looked up in ``version`` of ``namespace`` (the canary or the
        live version) with this outcome; the labelled child is looked up once."""
        count = self._answer_counts.get((namespace, version, canary, outcome))
        if count is None:
            role = "canary" if canary else "live"
            count = self.answers.labels(namespace, str(version), role, outcome).inc
            self._answer_counts[(namespace, version, canary, outcome)] = count
        count(keys)


class StateCollector(Collector):
    """Breaker state and the live version's age per namespace, computed at scrape time
    (a single process: its own state is the server's)."""

    def __init__(self, breaker_state: BreakerState, states: States) -> None:
        self._breaker_state = breaker_state
        self._states = states

    def collect(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(BREAKER, BREAKER_HELP, labels=["state"])
        current = self._breaker_state()
        for state in BREAKER_STATES:
            breaker.add_metric([state], 1.0 if state == current else 0.0)
        yield breaker
        age = GaugeMetricFamily(AGE, AGE_HELP, labels=["namespace"])
        version = GaugeMetricFamily(VERSION, VERSION_HELP, labels=["namespace"])
        now = time.time()
        for namespace, namespace_state in sorted(self._states().items()):
            info = namespace_state.live_info()
            if info is None:
                continue
            version.add_metric([namespace], float(info.version))
            if info.published_at:
                age.add_metric([namespace], now - published_unixtime(info.published_at))
        yield age
        yield version


def published_unixtime(published_at: str) -> float:
    return datetime.fromisoformat(published_at).timestamp()


class WorkerState:
    """One worker's breaker state and the live versions it has seen, in its own files.

    A value is written when it changes in this worker (checked every second, and by
    the worker answering a scrape just before it reads the files), never per request.

    - Breaker: ``livesum``, so per state the number of running workers in it (one
      worker: 1 for its state, as a single process shows). The breaker is per process
      (each has its own store connection), so neither a max nor one worker's view
      would say how much of the server is on the fallback; the labels stay ``state``
      alone (``all`` would add a ``pid`` label per restart).
    - Live version and its publication time: ``mostrecent``, the value most recently
      written by any worker. As each worker writes only what it sees change, that is
      the newest state of the store any worker has read: an idle worker whose cache is
      behind (the cache refreshes on requests) writes nothing, so it cannot bring back
      an old version after a publish or a rollback. Not ``max``: a rollback lowers it.
      Not ``live``: a dead worker's last sighting is still true for its time.
    """

    def __init__(self, breaker_state: BreakerState, states: States) -> None:
        self._breaker_state = breaker_state
        self._states = states
        self._breaker = Gauge(
            BREAKER, BREAKER_HELP, ["state"], registry=None, multiprocess_mode="livesum"
        )
        self._version = Gauge(
            VERSION, VERSION_HELP, ["namespace"], registry=None, multiprocess_mode="mostrecent"
        )
        self._published = Gauge(
            PUBLISHED,
            "When the live version of a namespace was published (Unix time).",
            ["namespace"],
            registry=None,
            multiprocess_mode="mostrecent",
        )
        self._breaker_written: str | None = None
        self._written: dict[str, tuple[int, str | None]] = {}

    def write(self) -> None:
        current = self._breaker_state()
        if current != self._breaker_written:
            for state in BREAKER_STATES:
                self._breaker.labels(state).set(1.0 if state == current else 0.0)
            self._breaker_written = current
        for namespace, namespace_state in self._states().items():
            info = namespace_state.live_info()
            if info is None or self._written.get(namespace) == (info.version, info.published_at):
                continue
            self._version.labels(namespace).set(info.version)
            if info.published_at:
                self._published.labels(namespace).set(published_unixtime(info.published_at))
            self._written[namespace] = (info.version, info.published_at)

    async def keep_written(self, every_seconds: float = 1.0) -> None:
        while True:
            self.write()
            await asyncio.sleep(every_seconds)


class SharedCollector(Collector):
    """The whole server at scrape time: every worker's files merged
    (``MultiProcessCollector``), the live versions' ages computed from when each was
    published (a file holds no clock)."""

    def __init__(self, path: str, write_own: Callable[[], None]) -> None:
        self._path = path
        self._write_own = write_own

    def describe(self) -> Iterator[Metric]:
        """Nothing: registering must neither read nor write the files (the registry would
        collect instead, and ``serve``'s own ``create_app`` would count as a worker)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        self._write_own()
        forget_dead_workers(self._path)
        now = time.time()
        for metric in MultiProcessCollector(None, self._path).collect():
            if metric.name != PUBLISHED:
                yield metric
                continue
            age = GaugeMetricFamily(AGE, AGE_HELP, labels=["namespace"])
            for sample in sorted(metric.samples, key=lambda s: s.labels["namespace"]):
                age.add_metric([sample.labels["namespace"]], now - sample.value)
            yield age


def forget_dead_workers(path: str) -> None:
    """``mark_process_dead`` for each process whose per-process gauges are in ``path`` but
    which is gone. uvicorn replaces a worker that died (killed, out of memory) and tells
    nobody (it has no hook), so the scrape looks: otherwise a dead worker's breaker
    state would be counted as a running one's forever."""
    pids = {
        int(os.path.basename(name)[: -len(".db")].rsplit("_", 1)[1])
        for name in glob.glob(os.path.join(path, "gauge_live*_*.db"))
    }
    for pid in pids:
        if not running(pid):
            mark_process_dead(pid, path)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


class AccessLog:
    """JSON lines on stderr, one per request, written once per turn of the event loop.

    Through ``logging`` every line would cost the event loop a LogRecord, a lookup
    of the caller's frame and the handler's lock, plus one ``write`` syscall per
    request, all on the path of every request. Here a line is one ``orjson.dumps``;
    the lines of every request finished in the same loop turn go out in one write at
    the end of that turn (at once when idle), so a line is never held back longer than
    the requests being served.
    """

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._scheduled = False

    def write(self, entry: dict[str, object]) -> None:
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

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self._observe: dict[tuple[str, str], Callable[[float], None]] = {}
        self._count: dict[tuple[str, int], Callable[[], None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
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
