"""``make bench-serve``: the lookup API under load on loopback (wrk), against its limits.

One run measures, at the same connection count: the cheapest route of the same
stack (``/healthz``: same app, middleware, uvicorn settings) as the limit;
single-key lookups through Redis, through a Redis Cluster (three primaries, three
replicas, ``redis+cluster://``), through the embedded store (LMDB) and through
the batch fallback (Redis stopped, breaker open); 100-key batches through Redis
and the cluster; and Feast's feature server (``feast serve``, its own venv) on the
same Redis and keys. For the choice of the cluster client it also drives, in one
process and without HTTP, single-key reads through batchscore's cluster reader
and through redis-py's ``redis.asyncio.RedisCluster`` on the same cluster. It
writes the tables into docs/benchmarks.md under its own section.

Data: a version of ``--keys`` keys written through ``kv_export`` (sorted Parquet
parts, ``export_parts``, ``publish``), exactly as the pipeline's export step does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.testing import RedisClusterServers, RedisServer, free_port, wait_for_http
from kv_export.encoding import bucket_count, bucket_of, redis_bucket_key
from kv_export.export import export_parts
from kv_export.redis_cluster_reader import RedisClusterReader
from kv_export.state import VersionInfo
from kv_export.store import NewVersion, PartInfo, open_store, utcnow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NS = "bench"
NS_CANARY = "bench_canary"  # the same keys, live version + a canary version at CANARY_PERCENT
CANARY_PERCENT = 10.0
FIRST_KEY = 1_000_000
SECTION = "## Lookup API (make bench-serve)"
CLIENT_CONCURRENCY = 32
FEAST_VENV = REPO / ".bench-venvs" / "feast"


def write_data(folder: Path, keys: int) -> tuple[list[Path], list[PartInfo], np.ndarray]:
    """Sorted parts of (customer_id, churn_probability), 10,000-row row groups."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(FIRST_KEY, FIRST_KEY + keys, dtype=np.int64)
    values = np.random.default_rng(0).random(keys, dtype=np.float32)
    paths, parts = [], []
    for i, rows in enumerate(np.array_split(np.arange(keys), 4)):
        path = folder / f"part-{i:04d}.parquet"
        pq.write_table(
            pa.table({"customer_id": ids[rows], "churn_probability": values[rows]}),
            path,
            row_group_size=10_000,
        )
        paths.append(path)
        parts.append(
            PartInfo(
                path=str(path),
                rows=len(rows),
                min_key=int(ids[rows][0]),
                max_key=int(ids[rows][-1]),
            )
        )
    return paths, parts, values


def publish(
    store_url: str,
    folder: Path,
    paths: list[Path],
    parts: list[PartInfo],
    namespace: str = NS,
    canary: bool = False,
) -> None:
    """Publish the keys as ``namespace``'s live version; with ``canary``, then export them
    again as a second version and start it as a canary at ``CANARY_PERCENT``."""
    store = open_store(store_url)
    rows = sum(p.rows for p in parts)
    new = NewVersion(
        run_id="bench-run",
        expected_keys=rows,
        buckets=bucket_count(rows),
        outputs=["churn_probability"],
        model_name="churn",
        model_version="1",
        scored_at=utcnow(),
        key_column="customer_id",
        key_type="int",
        output_dir=str(folder),
        parts=parts,
    )
    exported = export_parts(store, namespace, new, paths)
    store.publish(namespace, exported.info.version, keep=2)
    if canary:
        second = new.model_copy(update={"run_id": "bench-canary-run", "model_version": "2"})
        staged = export_parts(store, namespace, second, paths)
        store.start_canary(namespace, staged.info.version, CANARY_PERCENT)
    store.close()


@dataclass
class Result:
    name: str
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    note: str = ""
    api_cpu_us: float | None = None  # CPU time of the API process per request
    redis_cpu_us: float | None = None  # CPU time of redis-server per request


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a live process (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lua_single(prefix: str, keys: int) -> str:
    return textwrap.dedent(f"""
        math.randomseed(os.time())
        request = function()
          return wrk.format("GET", "{prefix}" .. math.random({FIRST_KEY}, {FIRST_KEY + keys - 1}))
        end
    """)


def lua_post(
    path: str, body_head: str, body_tail: str, keys: int, per_request: int, quote: bool
) -> str:
    q = '"' if quote else ""
    return textwrap.dedent(f"""
        math.randomseed(os.time())
        wrk.method = "POST"
        wrk.headers["Content-Type"] = "application/json"
        request = function()
          local ks = {{}}
          for i = 1, {per_request} do
            ks[i] = '{q}' .. math.random({FIRST_KEY}, {FIRST_KEY + keys - 1}) .. '{q}'
          end
          local body = '{body_head}' .. table.concat(ks, ",") .. '{body_tail}'
          return wrk.format(nil, "{path}", nil, body)
        end
    """)


def to_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(
    name: str,
    url: str,
    script: str | None,
    args: argparse.Namespace,
    tmp: Path,
    api: int | None = None,
    redis: int | None = None,
) -> Result:
    """One load; ``api`` / ``redis`` are the pids whose CPU time per request is reported."""
    command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", "--latency", "--timeout", "5s"]
    if script:
        path = tmp / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.lua"
        path.write_text(script)
        command += ["-s", str(path)]
    subprocess.run([*command, "-d2s", url], capture_output=True)  # warm-up, not reported
    before = [cpu_seconds(api), cpu_seconds(redis)]
    out = subprocess.run(
        [*command, f"-d{args.seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    after = [cpu_seconds(api), cpu_seconds(redis)]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    api_us, redis_us = (
        None if a is None or b is None or not done else 1e6 * (b - a) / done
        for a, b in zip(before, after, strict=True)
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # The percentile lines of "Latency Distribution" (a "+/- Stdev" column can end in 50.00%;
    # wrk pads a value in seconds with a trailing space).
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    notes = [f"{errors.group(1)} non-2xx"] if errors else []
    notes += [f"socket errors: {sockets.group(1)}"] if sockets else []
    note = "; ".join(notes)
    cpu = f"API CPU {api_us:6.1f} us/req" if api_us is not None else ""
    print(f"{name:42s} {rps:10.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms {cpu} {note}")
    return Result(name, rps, p50, p99, note, api_us, redis_us)


def serve(store_url: str, home: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    env |= {"BATCHSCORE_HOME": str(home)}
    process = subprocess.Popen(
        [str(BIN / "batchscore"), "serve", "--store", store_url, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/healthz", process=process, log=log)
    return process, base


FEAST_REPO = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
source = FileSource(path="{data}", timestamp_field="event_timestamp")
churn = FeatureView(name="churn_fv", entities=[customer], ttl=timedelta(days=3650),
                    schema=[Field(name="customer_id", dtype=Int64),
                            Field(name="churn_probability", dtype=Float32)], source=source)
"""
FEAST_LOAD = """
import pandas as pd
from feast import FeatureStore
store = FeatureStore(repo_path=".")
frame = pd.read_parquet("{data}")
store.write_to_online_store("churn_fv", frame)
"""


def run_feast(
    redis: RedisServer, keys: int, values: np.ndarray, tmp: Path, args: argparse.Namespace
) -> Result:
    """Feast's feature server on the same Redis and keys, or why it could not run."""
    feast = FEAST_VENV / "bin" / "feast"
    if not feast.exists():
        return Result(
            "Feast feature server (feast serve)",
            None,
            None,
            None,
            f"not run: {feast} missing (make bench-serve installs it)",
        )
    repo = tmp / "feast_repo"
    repo.mkdir()
    data = repo / "churn.parquet"
    ids = np.arange(FIRST_KEY, FIRST_KEY + keys, dtype=np.int64)
    stamp = pa.array(np.full(keys, np.datetime64("2026-11-01T00:00:00", "us")))
    pq.write_table(
        pa.table({"customer_id": ids, "churn_probability": values, "event_timestamp": stamp}), data
    )
    (repo / "feature_store.yaml").write_text(
        textwrap.dedent(f"""
        project: bench
        registry: {repo / "registry.db"}
        provider: local
        online_store:
          type: redis
          connection_string: "127.0.0.1:{redis.port}"
        offline_store:
          type: file
        entity_key_serialization_version: 3
    """)
    )
    (repo / "repo.py").write_text(FEAST_REPO.format(data=data))
    loader = tmp / "feast_load.py"  # outside the repo: `feast apply` imports every .py in it
    loader.write_text(FEAST_LOAD.format(data=data))
    python = FEAST_VENV / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    env["FEAST_USAGE"] = "False"
    for step in ([str(feast), "apply"], [str(python), str(loader)]):
        done = subprocess.run(step, cwd=repo, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return Result(
                "Feast feature server (feast serve)",
                None,
                None,
                None,
                f"not run: `{' '.join(step[-2:])}` failed: {why[0][:200]}",
            )
    port = free_port()
    server = subprocess.Popen(
        [str(feast), "serve", "-h", "127.0.0.1", "-p", str(port)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "feast.log").open("wb"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/health", seconds=120, process=server, ok=lambda s: s < 500)
        probe = httpx.post(
            base + "/get-online-features",
            timeout=10,
            json={
                "features": ["churn_fv:churn_probability"],
                "entities": {"customer_id": [FIRST_KEY]},
            },
        )
        assert probe.status_code == 200, probe.text
        head = '{"features": ["churn_fv:churn_probability"], "entities": {"customer_id": ['
        script = lua_post("/get-online-features", head, "]}}", keys, 1, quote=False)
        return wrk("Feast feature server (feast serve), 1 key", base, script, args, tmp)
    finally:
        server.terminate()
        server.wait(20)


@dataclass
class ClientResult:
    name: str
    reads_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # this process's CPU time per read


async def _drive(read: Any, keys: list[bytes], seconds: float, concurrency: int) -> list[float]:
    """``concurrency`` tasks reading random keys for ``seconds``; every read's latency."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    rng = np.random.default_rng(1)

    async def worker() -> None:
        picks = rng.integers(0, len(keys), 1_000_000)
        i = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            assert await read(keys[picks[i % len(picks)]]) is not None
            latencies.append(time.perf_counter() - started)
            i += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def cluster_clients(url: str, keys: int, seconds: float, concurrency: int) -> list[ClientResult]:
    """Single-key reads of the cluster's live version through each candidate client, in
    this process (uvloop, as the API), back to back: the cost the client adds."""
    import uvloop

    names = [str(FIRST_KEY + k).encode() for k in range(keys)]
    results = []

    async def live() -> VersionInfo:
        reader = RedisClusterReader(url, timeout_seconds=5)
        info = (await reader.state(NS)).live_info()
        await reader.close()
        assert info is not None
        return info

    def bucket_reader(info: VersionInfo, hget: Any) -> Any:
        """A library client's read of one key: HGET of its bucket, as the reader sends."""

        def read(key: bytes) -> Any:
            bucket = bucket_of(key, info.buckets)
            return hget(redis_bucket_key(NS, info.version, bucket, info.encoding), key)

        return read

    async def measured(read: Any) -> tuple[list[float], float]:
        await _drive(read, names, 1, concurrency)  # warm-up
        cpu = time.process_time()
        latencies = await _drive(read, names, seconds, concurrency)
        return latencies, time.process_time() - cpu

    async def ours() -> tuple[list[float], float]:
        info = await live()
        reader = RedisClusterReader(url, timeout_seconds=5)
        try:
            return await measured(lambda key: reader.get_one(NS, info, key))
        finally:
            await reader.close()

    async def redis_py() -> tuple[list[float], float]:
        from redis.asyncio.cluster import RedisCluster

        info = await live()
        client = RedisCluster(host=host, port=port, socket_timeout=5)
        try:
            return await measured(bucket_reader(info, client.hget))
        finally:
            await client.aclose()

    async def coredis_client() -> tuple[list[float], float]:
        import coredis

        info = await live()
        async with coredis.RedisCluster(host=host, port=port) as client:
            return await measured(bucket_reader(info, client.hget))

    async def glide_client() -> tuple[list[float], float]:
        from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress

        info = await live()
        config = GlideClusterClientConfiguration([NodeAddress(host, port)], request_timeout=5000)
        client = await GlideClusterClient.create(config)
        try:
            return await measured(bucket_reader(info, client.hget))
        finally:
            await client.close()

    import coredis
    import glide
    import redis as redis_py_package

    seed = url.removeprefix("redis+cluster://").split(",")[0]
    host, port = seed.rsplit(":", 1)[0], int(seed.rsplit(":", 1)[1])
    candidates = [
        ("batchscore cluster reader (pipelined RESP routed by slot)", ours),
        (f"redis-py {redis_py_package.__version__} redis.asyncio.RedisCluster", redis_py),
        (f"coredis {coredis.__version__} RedisCluster", coredis_client),
        (f"valkey-glide {_version('valkey-glide')} GlideClusterClient", glide_client),
    ]
    del glide
    for name, run in candidates:
        latencies, cpu = uvloop.run(run())
        latencies.sort()
        done = len(latencies)
        results.append(
            ClientResult(
                name,
                done / seconds,
                1000 * latencies[done // 2],
                1000 * latencies[int(done * 0.99)],
                1e6 * cpu / done,
            )
        )
        r = results[-1]
        print(f"{name:60s} {r.reads_per_second:10.0f} reads/s p99 {r.p99_ms:.2f} ms")
    return results


def median_run(runs: list[Result]) -> Result:
    """The run with the median req/s (all its numbers come from that one run)."""
    return sorted(runs, key=lambda r: r.rps or 0.0)[len(runs) // 2]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratio(runs: list[Result], baselines: list[Result]) -> float | None:
    """The median, over the repeats, of a load's req/s over its baseline's in the same
    repeat (run back to back): on a shared machine a disturbance then hits both sides of
    each ratio, where a ratio of two medians would compare different moments."""
    ratios = sorted(r for a, b in zip(runs, baselines, strict=True) if (r := ratio(a.rps, b.rps)))
    return ratios[len(ratios) // 2] if ratios else None


def report(
    results: dict[str, Result],
    args: argparse.Namespace,
    seconds: float,
    canary_ratio: float | None = None,
    clients: list[ClientResult] | None = None,
) -> str:
    empty, redis, lmdb = results["empty"], results["redis"], results["lmdb"]
    fallback, feast = results["fallback"], results["feast"]

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "—" if x is None else format(x, spec)

    rows = [
        "| load | req/s | p50 ms | p99 ms | API CPU µs/req | redis-server CPU µs/req | note |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(
            f"| {r.name} | {fmt(r.rps, ',.0f')} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} | "
            f"{fmt(r.api_cpu_us, '.1f')} | {fmt(r.redis_cpu_us, '.1f')} | {r.note} |"
            for r in results.values()
        ),
    ]
    checks = []
    singles = [("Redis", redis), ("embedded (LMDB)", lmdb)]
    if "cluster" in results:
        singles.insert(1, ("Redis Cluster", results["cluster"]))
    for label, primary in singles:
        rps_ratio = ratio(primary.rps, empty.rps)
        p99_ratio = ratio(primary.p99_ms, empty.p99_ms)
        checks.append(
            f"| single key via {label}: req/s ≥ 0.7× empty | {fmt(rps_ratio)}× | "
            f"{'met' if rps_ratio and rps_ratio >= 0.7 else 'NOT met'} |"
        )
        checks.append(
            f"| single key via {label}: p99 ≤ 3× empty | {fmt(p99_ratio)}× | "
            f"{'met' if p99_ratio and p99_ratio <= 3 else 'NOT met'} |"
        )
    for label, mine in (("Redis", redis), ("LMDB", lmdb)):
        for stat in ("p50_ms", "p99_ms"):
            ours, theirs = getattr(mine, stat), getattr(feast, stat)
            verdict = "not measured" if theirs is None else ("met" if ours < theirs else "NOT met")
            checks.append(
                f"| {label} {stat[:3]} < Feast {stat[:3]} | "
                f"{fmt(ratio(ours, theirs))}× | {verdict} |"
            )
    staged = canary_ratio
    checks.append(
        f"| single key via Redis during a canary: req/s ≥ 0.95× without one (median of the "
        f"{args.repeat} back-to-back pairs) | {fmt(staged)}× | "
        f"{'met' if staged is not None and staged >= 0.95 else 'NOT met'} |"
    )
    fb = ratio(fallback.p99_ms, redis.p99_ms)
    checks.append(
        f"| fallback p99 ≤ 2× Redis p99 | {fmt(fb)}× | "
        f"{'met' if fb is not None and fb <= 2 else 'NOT met'} |"
    )
    clients_table = clients_lines(clients, args) if clients else []
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `make bench-serve` (`{' '.join(sys.argv)}`), measured "
            f"{time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, loopback, "
            f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s (after a 2 s warm-up; "
            f"the empty endpoint and the single-key loads interleaved {args.repeat} times, the "
            "run with the median req/s of each reported), "
            f"random keys out of {args.keys:,}; one API worker (`batchscore serve`, default "
            "settings: access log on, metrics on, auth off), the load generator on the same "
            f"CPUs. The whole run took {seconds:.0f} s; {load_average(args.load_at_start)}.",
            "",
            *rows,
            "",
            "| target | ratio | verdict |",
            "|---|---:|---|",
            *checks,
            "",
            "The empty endpoint is `/healthz` of the same app: same uvicorn settings (uvloop, "
            "httptools), same middleware (Prometheus metrics and the JSON access-log line), "
            "same route dispatch; it differs from a lookup only by the lookup's own work. The "
            "fallback row is the Redis-backed API with Redis stopped: the breaker is open and "
            "keys are answered from the live run's Parquet parts through the row-group index "
            "(decoded row groups cached in memory after the warm-up). The canary row is the "
            "same API and Redis on a second namespace holding the same keys twice: a live "
            f"version and a canary answering {CANARY_PERCENT:g} % of the keys, so each lookup "
            "also hashes its key and picks its version (interleaved with the row without a "
            "canary; its target is checked on the ratio of the two within each repeat). "
            "The Redis Cluster rows are a second API (`--store redis+cluster://...`) on a "
            "cluster of three primaries and three replicas started by the benchmark "
            "(`RedisClusterServers`) holding the same keys; its redis-server CPU column is "
            "empty (six processes). "
            "CPU µs/req is the "
            "process's user + system time during the measured window divided by the requests "
            "served.",
            "",
            *clients_table,
            *limits(results),
            "",
        ]
    )


def clients_lines(clients: list[ClientResult], args: argparse.Namespace) -> list[str]:
    """The cluster client comparison as a table, with how it was measured."""
    best = max(c.reads_per_second for c in clients)
    return [
        "Cluster client for the lookup API, chosen by measurement: single-key reads "
        f"of the same cluster's live version ({args.keys:,} keys) in one process (uvloop), "
        f"{args.seconds} s each after a 1 s warm-up, {CLIENT_CONCURRENCY} concurrent "
        "readers, no HTTP, the clients one after another. The rule: prefer a well-kept "
        "library where it is within 10 % of the best.",
        "",
        "| client | reads/s | p50 ms | p99 ms | client CPU µs/read | vs best |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {c.name} | {c.reads_per_second:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
            f"{c.cpu_us:.1f} | {c.reads_per_second / best:.2f}× |"
            for c in clients
        ),
        "",
    ]


CLIENTS_SECTION = "## Redis Cluster clients (bench/serve_bench.py --clients-only)"


def clients_only(args: argparse.Namespace) -> None:
    """Only the cluster client comparison, in its own section: a short run that needs no
    wrk and no API process."""
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    cluster = RedisClusterServers(tmp / "cluster")
    cluster.start()
    try:
        paths, parts, _ = write_data(tmp / "parts", args.keys)
        publish(cluster.url, tmp / "parts", paths, parts)
        clients = cluster_clients(cluster.url, args.keys, args.seconds, CLIENT_CONCURRENCY)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    section = "\n".join(
        [
            CLIENTS_SECTION,
            "",
            f"Command: `python bench/serve_bench.py {' '.join(sys.argv[1:])}`, measured "
            f"{time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, loopback; a Redis "
            "Cluster of three primaries and three replicas started by the benchmark. The "
            f"whole run took {time.monotonic() - started:.0f} s; "
            f"{load_average(args.load_at_start)}. `make bench-serve` measures the same "
            "beside the API's rows.",
            "",
            *clients_lines(clients, args),
        ]
    )
    print(section)
    if not args.no_write:
        write_section(section, CLIENTS_SECTION)


def limits(results: dict[str, Result]) -> list[str]:
    """Where the single-key lookups' API CPU goes, against what the 0.7× target allows."""
    empty = results["empty"]
    if empty.api_cpu_us is None:
        return []
    allowed = empty.api_cpu_us * (1 / 0.7 - 1)
    lines = [
        f"What bounds req/s: the API is one process, so its CPU time per request is the cost "
        f"that matters. The empty endpoint costs {empty.api_cpu_us:.0f} µs of API CPU per "
        "request (HTTP parsing, two socket writes per response, routing, middleware, metrics, "
        f"access log); a lookup may add at most {allowed:.0f} µs to stay at 0.7× its req/s. "
        "What a lookup adds is its own Python (live-pointer check, breaker, key checks, value "
        "decoding, JSON) and, through Redis, the socket exchange, shared by the requests of "
        "one event-loop turn, and the wake-ups of redis-server on the same two CPUs.",
    ]
    for key, label in (("redis", "Redis"), ("lmdb", "embedded (LMDB)")):
        r = results[key]
        if r.api_cpu_us is None or r.rps is None:
            continue
        share = r.api_cpu_us * r.rps / 1e6
        extra = f" plus {r.redis_cpu_us:.0f} µs in redis-server" if r.redis_cpu_us else ""
        lines.append(
            f"A single-key lookup via {label} added {r.api_cpu_us - empty.api_cpu_us:.0f} µs"
            f"{extra}, with the API at {share:.0%} of one core."
        )
    return [" ".join(lines), ""]


def load_average(at_start: float) -> str:
    """The 1-minute load average at the start and at the end of the run: how much other
    work shared the CPUs (on a machine of 2 CPUs, anything near 2 or above is busy)."""
    return f"1-minute load average {at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"


def write_section(section: str, heading: str = SECTION) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if following == -1 else text[following + 1 :])
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=3, help="Runs of each single-key load; the median is kept"
    )
    parser.add_argument("--no-write", action="store_true", help="Do not touch docs/")
    parser.add_argument(
        "--clients-only",
        action="store_true",
        help="Only compare the Redis Cluster clients (own section of docs/benchmarks.md)",
    )
    args = parser.parse_args()
    args.load_at_start = os.getloadavg()[0]  # how busy the CPUs were, for the report
    if args.clients_only:
        clients_only(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (make bench-serve installs the Debian package)")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis = RedisServer(tmp)
    redis.start()
    cluster = RedisClusterServers(tmp / "cluster")
    cluster.start()
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, Result] = {}
    try:
        paths, parts, values = write_data(tmp / "parts", args.keys)
        publish(redis.url, tmp / "parts", paths, parts)
        publish(redis.url, tmp / "parts", paths, parts, NS_CANARY, canary=True)
        publish(f"lmdb://{tmp / 'store'}", tmp / "parts", paths, parts)
        publish(cluster.url, tmp / "parts", paths, parts)
        on_cluster, cluster_base = serve(cluster.url, tmp / "home", tmp / "api-cluster.log")
        processes.append(on_cluster)
        on_redis, redis_base = serve(redis.url, tmp / "home", tmp / "api-redis.log")
        on_lmdb, lmdb_base = serve(f"lmdb://{tmp / 'store'}", tmp / "home", tmp / "api-lmdb.log")
        processes += [on_redis, on_lmdb]
        single = f"/v1/predictions/{NS}/"
        assert redis.process is not None
        pids = {"api": on_redis.pid, "redis": redis.process.pid}
        canaried = f"/v1/predictions/{NS_CANARY}/"
        answer = httpx.get(f"{redis_base}{canaried}{FIRST_KEY}", timeout=5).json()
        assert "canary" in answer, answer  # the namespace answers under its canary rule
        runs: dict[str, list[Result]] = {
            "empty": [], "redis": [], "cluster": [], "canary": [], "lmdb": []
        }  # fmt: skip
        for repeat in range(args.repeat):  # interleaved: a disturbance hits all alike
            runs["empty"].append(
                wrk(
                    "empty endpoint (/healthz, same stack)",
                    redis_base + "/healthz",
                    None,
                    args,
                    tmp,
                    **pids,
                )
            )
            pair = {
                "redis": ("single key, Redis", single),
                "canary": (f"single key, Redis, during a canary at {CANARY_PERCENT:g} %", canaried),
            }
            # The pair compared back to back, in turns first, so neither is always second.
            for name in ("redis", "canary") if repeat % 2 == 0 else ("canary", "redis"):
                label, prefix = pair[name]
                runs[name].append(
                    wrk(label, redis_base, lua_single(prefix, args.keys), args, tmp, **pids)
                )
            runs["cluster"].append(
                wrk(
                    "single key, Redis Cluster (3 primaries + 3 replicas)",
                    cluster_base,
                    lua_single(single, args.keys),
                    args,
                    tmp,
                    api=on_cluster.pid,
                )
            )
            runs["lmdb"].append(
                wrk(
                    "single key, embedded (LMDB)",
                    lmdb_base,
                    lua_single(single, args.keys),
                    args,
                    tmp,
                    api=on_lmdb.pid,
                )
            )
        results |= {name: median_run(found) for name, found in runs.items()}
        canary_ratio = paired_ratio(runs["canary"], runs["redis"])
        results["batch"] = wrk(
            "100-key batch, Redis",
            redis_base,
            lua_post(f"/v1/predictions/{NS}/batch", '{"keys": [', "]}", args.keys, 100, quote=True),
            args,
            tmp,
            **pids,
        )
        results["cluster_batch"] = wrk(
            "100-key batch, Redis Cluster",
            cluster_base,
            lua_post(f"/v1/predictions/{NS}/batch", '{"keys": [', "]}", args.keys, 100, quote=True),
            args,
            tmp,
            api=on_cluster.pid,
        )
        on_cluster.terminate()  # the client comparison has the CPUs to itself
        on_cluster.wait(10)
        clients = cluster_clients(cluster.url, args.keys, args.seconds, CLIENT_CONCURRENCY)
        results["feast"] = run_feast(redis, args.keys, values, tmp, args)
        redis.stop()
        for _ in range(20):  # open the breaker and warm the row-group cache
            httpx.get(redis_base + f"{single}{FIRST_KEY}", timeout=5)
        assert httpx.get(redis_base + f"{single}{FIRST_KEY}").json()["source"] == "batch"
        results["fallback"] = wrk(
            "single key, batch fallback (Redis stopped)",
            redis_base,
            lua_single(single, args.keys),
            args,
            tmp,
            api=on_redis.pid,
        )
        results = {
            k: results[k]
            for k in (
                "empty",
                "redis",
                "cluster",
                "canary",
                "lmdb",
                "fallback",
                "batch",
                "cluster_batch",
                "feast",
            )  # fmt: skip
        }
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        redis.stop()
        cluster.stop()
    section = report(results, args, time.monotonic() - started, canary_ratio, clients)
    print(section)
    if not args.no_write:
        write_section(section)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
