"""A soak: the lookup API under load for 60 s while versions change under it.

A real ``batchscore serve`` on a real redis-server; clients on loopback send single-key
and batch lookups as fast as they are answered, while the store goes through three
publishes (two of them inside the API's live-cache interval, so the version the API
believes live is deleted under it), a rollback and a collection. What must hold for
every answer: no 5xx, no 404 for a key that every version holds, and the value is the
one the version the answer names computes for that key.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kv_export.store import open_store
from tests.conftest import RedisServer
from tests.integration.test_api_service import KEYS, NS, export_version, score, write_version

pytestmark = [pytest.mark.slow, pytest.mark.redis]
SOAK_SECONDS = 60.0
CLIENTS = 6
BATCH_KEYS = 20


class Tally:
    """What the clients saw, counted (the soak sends tens of thousands of requests)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.wrong: list[str] = []

    def answer(self, key: int, body: dict[str, Any], source: str = "") -> None:
        version = str(body["model"]["version"])
        got = body["prediction"]["churn_probability"]
        want = float(score(np.array([key]), version)[0])
        with self.lock:
            self.versions[version] += 1
            if abs(got - want) > 1e-6 and len(self.wrong) < 20:
                self.wrong.append(f"key {key}: {got} from version {version}, expected {want}")

    def status(self, code: int, text: str) -> None:
        with self.lock:
            self.statuses[code] += 1
            if code != 200 and len(self.wrong) < 20:
                self.wrong.append(f"{code}: {text[:300]}")


def client_loop(base: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    chooser = random.Random(seed)
    with httpx.Client(base_url=base, timeout=10) as client:
        while not stop.is_set():
            if chooser.random() < 0.7:
                key = int(chooser.choice(KEYS))
                answer = client.get(f"/v1/predictions/{NS}/{key}")
                tally.status(answer.status_code, answer.text)
                if answer.status_code == 200:
                    tally.answer(key, answer.json())
                continue
            keys = [int(k) for k in chooser.sample(list(KEYS), BATCH_KEYS)]
            answer = client.post(
                f"/v1/predictions/{NS}/batch", json={"keys": [str(k) for k in keys]}
            )
            tally.status(answer.status_code, answer.text)
            if answer.status_code != 200:
                continue
            for key, result in zip(keys, answer.json()["results"], strict=True):
                if result["status"] != "found":
                    tally.status(404, f"batch: key {key} {result['status']}")
                    continue
                tally.answer(key, result)


def test_lookups_stay_right_while_versions_are_published_rolled_back_and_collected(
    tmp_path: Path, redis_server: RedisServer, start_api: Any, api_env: dict[str, str]
) -> None:
    url = redis_server.url
    write_version(url, tmp_path / "v1", KEYS, "1")
    api = start_api(api_env, url)
    tally, stop = Tally(), threading.Event()
    clients = [
        threading.Thread(target=client_loop, args=(api.base, seed, stop, tally))
        for seed in range(CLIENTS)
    ]
    started = time.monotonic()

    def at(second: float) -> None:
        time.sleep(max(0.0, started + second - time.monotonic()))

    events: list[str] = []
    for client in clients:
        client.start()
    try:
        at(8)
        write_version(url, tmp_path / "v2", KEYS, "2")
        events.append("published model 2")
        at(20)
        third = export_version(url, tmp_path / "v3", KEYS, "3")
        fourth = export_version(url, tmp_path / "v4", KEYS, "4")
        store = open_store(url)
        # Two publishes inside the API's live-cache interval (1 s): the version it
        # believes live (model 2) is deleted by the second (keep=2) while it serves it.
        store.publish(NS, third.version, keep=2)
        store.publish(NS, fourth.version, keep=2)
        events.append("published models 3 and 4 back to back")
        at(32)
        store.rollback(NS)
        events.append("rolled back to model 3")
        at(44)
        deleted = store.gc(NS, keep=1)
        events.append(f"collected versions {[d.version for d in deleted]}")
        at(SOAK_SECONDS)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    summary = f"statuses {dict(tally.statuses)}, versions {dict(tally.versions)}, events {events}"
    print(summary)
    assert not [c for c in tally.statuses if c >= 500], summary + "\n" + "\n".join(tally.wrong)
    assert tally.statuses[404] == 0, summary + "\n" + "\n".join(tally.wrong)
    assert tally.wrong == [], summary + "\n" + "\n".join(tally.wrong)
    assert set(tally.versions) == {"1", "2", "3", "4"}, summary
    assert sum(tally.statuses.values()) > 1000, f"too little load to judge: {summary}"
    live = open_store(url).state(NS).live_info()
    assert live is not None and live.model_version == "3"
