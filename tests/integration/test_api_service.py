"""The lookup API as a client sees it, over real HTTP (``batchscore serve`` in a subprocess),
against a real redis-server and the embedded store.

Versions are written straight through ``kv_export`` (sorted Parquet parts, then
``export_parts`` and ``publish``, as the pipeline's export step does), so these
tests need no MLflow or Dask and run in seconds.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from kv_export.encoding import bucket_count
from kv_export.export import export_parts
from kv_export.store import NewVersion, PartInfo, VersionInfo, open_store, utcnow
from tests.conftest import ApiProcess, RedisServer

pytestmark = [pytest.mark.slow]
NS = "churn"
KEYS = np.arange(1_000_000, 1_006_000, dtype=np.int64)


def score(keys: np.ndarray, model_version: str) -> np.ndarray:
    """What 'model version N' predicts for a key: a pure function the tests can check."""
    return ((keys % 997) / 997 + int(model_version)).astype(np.float32)


def write_version(
    store_url: str,
    folder: Path,
    keys: np.ndarray,
    model_version: str,
    namespace: str = NS,
) -> VersionInfo:
    """Publish a version of ``keys`` (parts sorted by key, 500-row row groups)."""
    exported = export_version(store_url, folder, keys, model_version, namespace)
    store = open_store(store_url)
    info = store.publish(namespace, exported.version, keep=2)
    store.close()
    return info


def export_version(
    store_url: str,
    folder: Path,
    keys: np.ndarray,
    model_version: str,
    namespace: str = NS,
) -> VersionInfo:
    """Load a complete, unpublished version of ``keys`` whose values ``score`` gives."""
    store = open_store(store_url)
    folder.mkdir(parents=True, exist_ok=True)
    keys = np.sort(keys)
    values = score(keys, model_version)
    parts, paths = [], []
    for i, rows in enumerate(np.array_split(np.arange(len(keys)), 3)):
        path = folder / f"part-{i:04d}.parquet"
        table = pa.table({"customer_id": keys[rows], "churn_probability": values[rows]})
        pq.write_table(table, path, row_group_size=500)
        paths.append(path)
        parts.append(
            PartInfo(
                path=str(path),
                rows=len(rows),
                min_key=int(keys[rows][0]),
                max_key=int(keys[rows][-1]),
            )
        )
    new = NewVersion(
        run_id=f"run-{namespace}-{model_version}",
        expected_keys=len(keys),
        buckets=bucket_count(len(keys)),
        outputs=["churn_probability"],
        model_name="churn",
        model_version=model_version,
        scored_at=utcnow(),
        key_column="customer_id",
        key_type="int",
        output_dir=str(folder),
        parts=parts,
    )
    exported = export_parts(store, namespace, new, paths)
    store.close()
    return exported.info


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that keeps its data across stop/start (AOF, fsync on every write).

    The shared fixture's server has no persistence, so a restarted one is empty:
    the API would then rightly see no live version. A production Redis persists
    (or is replicated); recovery is tested against that.
    """
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.stop()


Start = Callable[[dict[str, str], str], ApiProcess]


def get(api: ApiProcess, path: str, **headers: str) -> httpx.Response:
    return httpx.get(api.base + path, headers=headers, timeout=10)


def check(body: dict[str, Any], key: int, version: str, source: str, stale: bool = False) -> None:
    assert body["key"] == str(key)
    assert body["prediction"]["churn_probability"] == pytest.approx(
        float(score(np.array([key]), version)[0])
    )
    assert body["model"] == {"name": "churn", "version": version}
    assert body["run_id"] == f"run-{NS}-{version}"
    assert body["scored_at"] and body["source"] == source and body["stale"] is stale


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.mark.redis
def test_redis_dies_and_returns_no_5xx_for_live_keys_and_kv_again_after(
    api_env: dict[str, str], persistent_redis: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    write_version(persistent_redis.url, tmp_path / "v1", KEYS, "1")
    api = start_api(api_env, persistent_redis.url)
    sample = [int(k) for k in KEYS[::997]]
    check(get(api, f"/v1/predictions/{NS}/{sample[0]}").json(), sample[0], "1", "kv")

    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=api.base, timeout=10) as client:
            while not stop.is_set():
                for key in sample:
                    statuses.append(client.get(f"/v1/predictions/{NS}/{key}").status_code)

    readers = [threading.Thread(target=hammer) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(0.5)
        persistent_redis.stop()
        wait_for(lambda: get(api, f"/v1/predictions/{NS}/{sample[1]}").json()["source"] == "batch")
        for key in sample:
            check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "1", "batch")
        batch = httpx.post(
            api.base + f"/v1/predictions/{NS}/batch",
            json={"keys": [str(sample[2]), "42"]},
            timeout=10,
        ).json()["results"]
        assert [r["status"] for r in batch] == ["found", "not_found"]
        assert {r["source"] for r in batch} == {"batch"}
        assert get(api, f"/v1/predictions/{NS}/42").status_code == 404
        ready = get(api, "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        metrics = get(api, "/metrics").text
        assert 'batchscore_store_circuit_state{state="opened"} 1.0' in metrics
        assert 'batchscore_lookup_fallbacks_total{fallback="batch"' in metrics

        persistent_redis.start()
        wait_for(lambda: get(api, f"/v1/predictions/{NS}/{sample[1]}").json()["source"] == "kv")
        assert get(api, "/readyz").json()["status"] == "ready"
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    check(get(api, f"/v1/predictions/{NS}/{sample[3]}").json(), sample[3], "1", "kv")


def metric(api: ApiProcess, sample: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in get(api, "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.redis
def test_a_hung_redis_is_probed_in_the_background_never_on_a_request(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    """Redis stops answering (SIGSTOP: connections open, no replies). Once the breaker is
    open no lookup is sent to the store any more, also when the breaker is due for a probe
    (every 0.3 s here): the probe runs in the background and every request is answered
    from the batch output at once, until Redis answers again."""
    write_version(redis_server.url, tmp_path / "v1", KEYS, "1")
    api = start_api(api_env | {"BATCHSCORE_BREAKER_RESET_SECONDS": "0.3"}, redis_server.url)
    sample = [int(k) for k in KEYS[::499]]
    check(get(api, f"/v1/predictions/{NS}/{sample[0]}").json(), sample[0], "1", "kv")
    store_errors = 'batchscore_lookup_fallbacks_total{fallback="batch",reason="store_error"}'
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: (
                get(api, f"/v1/predictions/{NS}/{sample[1]}").json()["source"] == "batch"
                and metric(api, 'batchscore_store_circuit_state{state="opened"}') == 1.0
            )
        )
        failed_on_requests = metric(api, store_errors)
        deadline = time.monotonic() + 3  # ten reset periods: probes go out and time out
        with httpx.Client(base_url=api.base, timeout=10) as client:
            while time.monotonic() < deadline:
                for key in sample:
                    check(client.get(f"/v1/predictions/{NS}/{key}").json(), key, "1", "batch")
        assert metric(api, store_errors) == failed_on_requests  # no request waited on Redis
        assert get(api, "/readyz").json()["status"] == "degraded"
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: get(api, f"/v1/predictions/{NS}/{sample[2]}").json()["source"] == "kv")


@pytest.mark.redis
def test_keys_the_live_version_lacks_come_from_the_previous_one_marked_stale(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    write_version(redis_server.url, tmp_path / "v1", KEYS, "1")
    write_version(redis_server.url, tmp_path / "v2", KEYS[:3000], "2")
    old_only, both = int(KEYS[4000]), int(KEYS[10])
    plain = start_api(api_env, redis_server.url)
    assert get(plain, f"/v1/predictions/{NS}/{old_only}").status_code == 404

    api = start_api(api_env | {"BATCHSCORE_STALE_FALLBACK": "true"}, redis_server.url)
    check(get(api, f"/v1/predictions/{NS}/{both}").json(), both, "2", "kv")
    check(get(api, f"/v1/predictions/{NS}/{old_only}").json(), old_only, "1", "kv", stale=True)
    results = httpx.post(
        api.base + f"/v1/predictions/{NS}/batch",
        timeout=10,
        json={"keys": [str(both), str(old_only), "42"]},
    ).json()["results"]
    assert [(r["status"], r["stale"], r["model"]["version"]) for r in results] == [
        ("found", False, "2"),
        ("found", True, "1"),
        ("not_found", False, "2"),
    ]
    assert get(api, f"/v1/predictions/{NS}/42").status_code == 404

    redis_server.stop()  # the stale answer then comes from the previous run's batch output
    wait_for(lambda: get(api, f"/v1/predictions/{NS}/{both}").json()["source"] == "batch")
    check(get(api, f"/v1/predictions/{NS}/{old_only}").json(), old_only, "1", "batch", stale=True)


@pytest.mark.redis
def test_redis_password_comes_from_the_setting_and_never_reaches_a_client_or_log(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    server.start(password="s3cret")
    try:
        authed = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        write_version(authed, tmp_path / "v1", KEYS, "1")
        key = int(KEYS[11])
        path = f"/v1/predictions/{NS}/{key}"

        api = start_api(api_env | {"BATCHSCORE_STORE_PASSWORD": "s3cret"}, server.url)
        check(get(api, path).json(), key, "1", "kv")
        batch = httpx.post(api.base + f"/v1/predictions/{NS}/batch", json={"keys": [str(key)]})
        assert batch.json()["results"][0]["source"] == "kv"
        assert get(api, "/readyz").json()["status"] == "ready"

        without = start_api(api_env, server.url)  # the server refuses it: NOAUTH
        refused = get(without, path)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "store_unavailable"
        assert get(without, "/readyz").status_code == 503

        wrong = start_api(api_env | {"BATCHSCORE_STORE_PASSWORD": "wrong"}, authed)
        check(get(wrong, path).json(), key, "1", "kv")  # the URL's password wins

        for process in (api, without, wrong):
            assert "s3cret" not in process.log.read_text()
        assert "s3cret" not in refused.text
    finally:
        server.stop()


def test_api_keys_scopes_and_namespaces(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "churn", KEYS, "1")
    write_version(store_url, tmp_path / "fraud", KEYS[:100], "1", namespace="fraud")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# analysts\nchurn-reader: churn\n\nadmin-key: *\n")
    api = start_api(
        api_env
        | {
            "BATCHSCORE_API_KEYS_FILE": str(keys_file),
            "BATCHSCORE_API_KEYS": json.dumps({"fraud-reader": ["fraud"]}),
        },
        store_url,
    )
    key = int(KEYS[5])
    path = f"/v1/predictions/{NS}/{key}"

    missing = get(api, path)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert get(api, path, authorization="Bearer wrong").status_code == 401
    assert get(api, path, **{"x-api-key": "churn-reader-and-more"}).status_code == 401
    check(get(api, path, authorization="Bearer churn-reader").json(), key, "1", "kv")
    check(get(api, path, **{"x-api-key": "admin-key"}).json(), key, "1", "kv")
    forbidden = get(api, path, **{"x-api-key": "fraud-reader"})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert (
        httpx.post(
            api.base + f"/v1/predictions/{NS}/batch",
            json={"keys": [str(key)]},
            headers={"x-api-key": "fraud-reader"},
        ).status_code
        == 403
    )

    listed = get(api, "/v1/namespaces", **{"x-api-key": "fraud-reader"}).json()["namespaces"]
    assert [n["namespace"] for n in listed] == ["fraud"]
    everything = get(api, "/v1/namespaces", **{"x-api-key": "admin-key"}).json()
    assert [n["namespace"] for n in everything["namespaces"]] == ["churn", "fraud"]
    churn = get(api, f"/v1/namespaces/{NS}", authorization="Bearer churn-reader").json()
    assert churn["live_version"] == 1 and churn["key_count"] == len(KEYS)
    assert churn["model"] == {"name": "churn", "version": "1"} and churn["age_seconds"] >= 0
    assert get(api, "/v1/namespaces/fraud", authorization="Bearer churn-reader").status_code == 403
    assert get(api, "/v1/namespaces/nope", **{"x-api-key": "admin-key"}).status_code == 404
    assert get(api, "/healthz").status_code == 200  # probes need no key
    assert get(api, "/readyz").status_code == 200
    log = api.log.read_text()
    assert "churn-reader" not in log and "admin-key" not in log  # keys never reach the logs
    logged = {json.loads(line).get("key_id") for line in log.splitlines() if line[:1] == "{"}
    named = {hashlib.sha256(k.encode()).hexdigest()[:8] for k in ("churn-reader", "admin-key")}
    assert named <= logged  # a key is named by the first 8 hex digits of its digest


def test_limits_413_422_429(api_env: dict[str, str], start_api: Start, tmp_path: Path) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    api = start_api(
        api_env
        | {
            "BATCHSCORE_MAX_BATCH_KEYS": "5",
            "BATCHSCORE_MAX_KEY_LENGTH": "16",
        },
        store_url,
    )
    batch = api.base + f"/v1/predictions/{NS}/batch"
    too_many = httpx.post(batch, json={"keys": [str(k) for k in KEYS[:6]]})
    assert too_many.status_code == 413 and "5" in too_many.json()["error"]["message"]
    assert httpx.post(batch, json={"keys": [str(k) for k in KEYS[:5]]}).status_code == 200
    for bad in ("a b", "x" * 17, "é", "<script>"):
        answer = get(api, f"/v1/predictions/{NS}/{bad}")
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_key", bad
        assert httpx.post(batch, json={"keys": ["1000001", bad]}).status_code == 422
    for body in ({"keys": []}, {"keys": "1000001"}, {}, [1, 2]):
        answer = httpx.post(batch, json=body)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request"
    assert (
        httpx.post(
            batch, content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert get(api, "/v1/predictions/bad%7Bns%7D/1").status_code == 422

    limited = start_api(
        api_env
        | {
            "BATCHSCORE_API_KEYS": json.dumps({"k1": ["*"], "k2": ["*"]}),
            "BATCHSCORE_RATE_LIMIT_PER_SECOND": "0.2",
            "BATCHSCORE_RATE_LIMIT_BURST": "3",
        },
        store_url,
    )
    path = f"/v1/predictions/{NS}/{int(KEYS[0])}"
    statuses = [get(limited, path, **{"x-api-key": "k1"}).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    refused = get(limited, path, **{"x-api-key": "k1"})
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert get(limited, path, **{"x-api-key": "k2"}).status_code == 200  # per key


def test_errors_are_json_and_leak_nothing(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    for part in (tmp_path / "v1").glob("*.parquet"):
        part.unlink()  # the batch output is gone; the store still answers
    api = start_api(api_env | {"BATCHSCORE_CORS_ORIGINS": '["https://app.example"]'}, store_url)
    assert get(api, f"/v1/predictions/{NS}/{int(KEYS[1])}").status_code == 200
    for answer in (get(api, "/nope"), httpx.delete(api.base + f"/v1/predictions/{NS}/1")):
        body = answer.json()
        assert answer.status_code in (404, 405) and set(body) == {"error"}
    unknown = get(api, "/v1/predictions/other/1")
    assert unknown.status_code == 404 and str(tmp_path) not in unknown.text
    cors = get(api, "/healthz", origin="https://app.example")
    assert cors.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in get(api, "/healthz", origin="https://evil").headers
    metrics = get(api, "/metrics").text
    assert 'route="/v1/predictions/{namespace}/{key}",source="kv"' in metrics
    assert 'batchscore_live_version_age_seconds{namespace="churn"}' in metrics
    log_lines = [
        json.loads(line) for line in api.log.read_text().splitlines() if line.startswith("{")
    ]
    assert {"route", "status", "ms", "source", "method"} <= set(log_lines[-1])


def worker_pids(api: ApiProcess) -> set[int]:
    """The uvicorn worker processes of ``api``: its children started through
    multiprocessing's spawn (uvicorn's way; its resource tracker is a child too)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        if parent == api.process.pid and b"spawn_main" in command:
            found.add(int(stat.parent.name))
    return found


LOOKUP_ROUTE = "/v1/predictions/{namespace}/{key}"


def lookups_answered_by_each_process(metrics_dir: Path) -> dict[int, float]:
    """Lookups answered, per process, each read from that process's own counter file of
    prometheus_client's multiprocess mode (``counter_<pid>.db``)."""
    answered: dict[int, float] = {}
    for file in metrics_dir.glob("counter_*.db"):
        pid = int(file.stem.split("_")[1])
        for metric in MultiProcessCollector.merge([str(file)]):
            for sample in metric.samples:
                if (
                    sample.name == "batchscore_lookup_responses_total"
                    and sample.labels["route"] == LOOKUP_ROUTE
                ):
                    answered[pid] = answered.get(pid, 0.0) + sample.value
    return answered


def test_serve_with_several_workers(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    """Two worker processes, and both answer lookups: requests go out several at a time,
    each on a new connection, until each worker has answered some (or a deadline)."""
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    api = start_api(
        api_env | {"BATCHSCORE_API_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        store_url,
    )
    workers = worker_pids(api)
    assert len(workers) == 2 and api.process.pid not in workers
    key = int(KEYS[7])
    sent = 0
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while set(lookups_answered_by_each_process(metrics_dir)) != workers:
            assert time.monotonic() < deadline, lookups_answered_by_each_process(metrics_dir)
            answers = list(pool.map(lambda _: get(api, f"/v1/predictions/{NS}/{key}"), range(8)))
            for answer in answers:
                check(answer.json(), key, "1", "kv")
            sent += len(answers)
    answered = lookups_answered_by_each_process(metrics_dir)
    assert set(answered) == workers and sum(answered.values()) == sent
    assert worker_pids(api) == workers  # none of them died serving
