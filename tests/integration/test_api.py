"""The lookup API over real HTTP (uvicorn in a subprocess) against both stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchscore.core.settings import RunSettings, load_settings
from jobs.manifest import Manifest
from tests.conftest import RedisServer, Registry, direct_forward, read_rows, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
KEYS = [1_000_003, 1_004_321, 1_011_998]


def publish_run(dataset: Path, store_url: str, model: str, namespace: str = "api") -> Manifest:
    return run_job(dataset, model, namespace, store_url=store_url)


def expected(registry: Registry, dataset: Path, model_uri: str, keys: list[int]) -> list[float]:
    rows = read_rows(dataset, keys)
    out = direct_forward(registry.tracking_uri, model_uri, np.stack([rows[k] for k in keys]))
    return [float(v) for v in out[:, 0]]


def check_answer(
    body: dict[str, Any], key: int, value: float, manifest: Manifest, source: str
) -> None:
    assert body["key"] == str(key)
    assert body["prediction"]["churn_probability"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert body["model"] == {"name": "churn", "version": manifest.model.version}
    assert body["run_id"] == manifest.run_id
    assert body["mlflow_run_id"] == manifest.mlflow_run_id  # the MLflow run that recorded it
    assert body["scored_at"] and body["source"] == source and body["stale"] is False


def test_lookup_api_on_the_embedded_store(
    env: dict[str, str], registry: Registry, dataset: Path, start_api: Any
) -> None:
    store_url = load_settings(RunSettings).resolved_store_url
    manifest = publish_run(dataset, store_url, "models:/churn/1")
    assert manifest.mlflow_run_id, "the run recorded no MLflow run"
    api = start_api(env, store_url)
    values = expected(registry, dataset, "models:/churn/1", KEYS)
    described = api.get("/v1/namespaces/api").json()
    assert described["mlflow_run_id"] == manifest.mlflow_run_id

    for key, value in zip(KEYS, values, strict=True):
        answer = api.get(f"/v1/predictions/api/{key}")
        assert answer.status_code == 200, answer.text
        check_answer(answer.json(), key, value, manifest, "kv")

    missing = api.get("/v1/predictions/api/42")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"
    assert "42" in missing.json()["error"]["message"]
    unknown = api.get("/v1/predictions/nosuchns/42")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "namespace_not_found"

    batch = api.post("/v1/predictions/api/batch", {"keys": [str(KEYS[0]), "42", str(KEYS[2])]})
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert [r["status"] for r in results] == ["found", "not_found", "found"]
    check_answer(results[2], KEYS[2], values[2], manifest, "kv")
    assert results[1]["prediction"] is None

    too_many = api.post("/v1/predictions/api/batch", {"keys": [str(i) for i in range(1001)]})
    assert too_many.status_code == 413 and "1000" in too_many.json()["error"]["message"]
    assert api.post("/v1/predictions/api/batch", {"keys": []}).status_code == 422
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/predictions/{namespace}/{key}", "/v1/predictions/{namespace}/batch"} <= set(paths)


def test_readers_see_one_version_while_a_new_one_is_published(
    env: dict[str, str], registry: Registry, dataset: Path, start_api: Any
) -> None:
    store_url = load_settings(RunSettings).resolved_store_url
    publish_run(dataset, store_url, "models:/churn/1")
    api = start_api(env, store_url)
    keys = [1_000_000 + i * 397 for i in range(25)]
    by_version = {v: expected(registry, dataset, f"models:/churn/{v}", keys) for v in ("1", "2")}
    seen: list[dict[str, Any]] = []
    stop, switched = threading.Event(), threading.Event()

    def read() -> None:
        while not stop.is_set():
            body = {"keys": [str(k) for k in keys]}
            seen.append(api.post("/v1/predictions/api/batch", body).json())
            if seen[-1]["results"][0]["model"]["version"] == "2":
                switched.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        publish_run(dataset, store_url, "models:/churn/2")
        assert switched.wait(10), "version 2 never answered"  # the live pointer is cached ~1 s
    finally:
        stop.set()
        reader.join()
    versions = set()
    for body in seen:
        results = body["results"]
        version = {r["model"]["version"] for r in results}
        assert len(version) == 1, "one answer mixed two versions"
        got = [r["prediction"]["churn_probability"] for r in results]
        assert got == pytest.approx(by_version[version.pop()], rel=1e-5, abs=1e-6)
        versions.add(results[0]["model"]["version"])
    assert versions == {"1", "2"}


@pytest.mark.redis
def test_batch_fallback_when_redis_is_down(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    start_api: Any,
    redis_server: RedisServer,
) -> None:
    manifest = publish_run(dataset, redis_server.url, "models:/churn/1")
    api = start_api(env, redis_server.url)
    values = expected(registry, dataset, "models:/churn/1", KEYS)
    first = api.get(f"/v1/predictions/api/{KEYS[0]}").json()
    check_answer(first, KEYS[0], values[0], manifest, "kv")

    statuses: list[int] = []
    stop, reading, on_batch = threading.Event(), threading.Event(), threading.Event()

    def read_while_redis_dies() -> None:
        while not stop.is_set():
            for key in KEYS:
                answer = api.get(f"/v1/predictions/api/{key}")
                statuses.append(answer.status_code)
                reading.set()
                if answer.status_code == 200 and answer.json()["source"] == "batch":
                    on_batch.set()

    reader = threading.Thread(target=read_while_redis_dies)
    reader.start()
    try:
        assert reading.wait(30), "no answer before Redis stopped"
        redis_server.stop()
        assert on_batch.wait(30), "the batch fallback never answered"
        answered = len(statuses)
        deadline = time.monotonic() + 30  # a few more rounds once on the fallback
        while len(statuses) < answered + 3 * len(KEYS):
            assert time.monotonic() < deadline, "the reader stopped getting answers"
            stop.wait(0.05)
    finally:
        stop.set()
        reader.join()
    assert statuses and set(statuses) == {200}, "a key of the live run got an error"
    # Ready, degraded: the store is down but the live run's batch output can answer.
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    for key, value in zip(KEYS, values, strict=True):
        answer = api.get(f"/v1/predictions/api/{key}")
        assert answer.status_code == 200, answer.text
        check_answer(answer.json(), key, value, manifest, "batch")
    batch = api.post("/v1/predictions/api/batch", {"keys": [str(KEYS[1]), "42"]}).json()["results"]
    assert [r["status"] for r in batch] == ["found", "not_found"]
    assert {r["source"] for r in batch} == {"batch"}
    assert api.get("/v1/predictions/api/42").status_code == 404
    assert api.get("/v1/predictions/other/42").status_code == 503
