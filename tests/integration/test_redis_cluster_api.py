"""The pipeline and the lookup API on a real Redis Cluster, also while it changes.

- ``batchscore run --store redis+cluster://...`` exports and publishes; ``batchscore serve``
  answers single and batch lookups from the cluster.
- ``redis-cli --cluster reshard`` moves the slots that hold the namespace's data and
  state while the API is under load: no 5xx, every answer right (MOVED/ASK followed).
- A primary killed while the API serves: every lookup answers, from the store or from
  the batch fallback (``source`` says which), and from the store again once its
  replica was promoted.
- An export while a primary is killed either completes (every key readable) or fails
  with the live version as it was.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
from redis.crc import key_slot

from jobs.manifest import Manifest
from kv_export.encoding import encode_keys, pack_values, redis_bucket_key, redis_state_key
from kv_export.encoding import text_keys as to_text_keys
from kv_export.errors import StoreUnavailable
from kv_export.redis_cluster import RedisClusterStore
from kv_export.store import open_store
from tests.conftest import (
    KEY,
    RedisClusterServers,
    Registry,
    direct_forward,
    new_version,
    read_rows,
    run_cli,
    run_job,
)

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]
KEYS = [1_000_003, 1_004_321, 1_011_998, 1_000_000, 1_007_777, 1_002_468]
NS = "churn_cluster"


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    yield cluster
    cluster.stop()


def expected(registry: Registry, dataset: Path, model_uri: str) -> dict[int, float]:
    rows = read_rows(dataset, KEYS)
    out = direct_forward(registry.tracking_uri, model_uri, np.stack([rows[k] for k in KEYS]))
    return {k: float(v) for k, v in zip(KEYS, out[:, 0], strict=True)}


def data_slots(manifest: Manifest) -> set[int]:
    """The slots of the namespace's state key and of its live version's bucket groups."""
    store = open_store(manifest.params.store_url)
    info = store.state(manifest.namespace).live_info()
    store.close()
    assert info is not None
    groups = {
        key_slot(redis_bucket_key(manifest.namespace, info.version, b, info.encoding))
        for b in range(0, info.buckets, 1024)
    }
    return groups | {key_slot(redis_state_key(manifest.namespace))}


class Load:
    """Threads reading single keys and batches from the API until stopped, keeping every
    status, source and value (a value compared with the model's own answer)."""

    def __init__(self, base: str, truth: dict[int, float], threads: int = 3) -> None:
        self.base, self.truth = base, truth
        self.statuses: Counter[int] = Counter()
        self.sources: list[tuple[float, str]] = []  # (when, source) of every answer
        self.wrong: list[object] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _check(self, key: str, body: dict[str, Any]) -> None:
        got = body["prediction"]["churn_probability"]
        if abs(got - self.truth[int(key)]) > 1e-5:
            self.wrong.append((key, body))
        self.sources.append((time.monotonic(), body["source"]))

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self._stop.is_set():
                if index % 2:
                    answer = client.post(
                        f"/v1/predictions/{NS}/batch", json={"keys": [str(k) for k in KEYS]}
                    )
                    self.statuses[answer.status_code] += 1
                    if answer.status_code == 200:
                        for result in answer.json()["results"]:
                            self._check(result["key"], result)
                    continue
                for key in KEYS:
                    answer = client.get(f"/v1/predictions/{NS}/{key}")
                    self.statuses[answer.status_code] += 1
                    if answer.status_code == 200:
                        self._check(str(key), answer.json())

    def answered_since(self, moment: float, source: str) -> int:
        return sum(1 for when, s in self.sources if when >= moment and s == source)

    def wait_for(self, count: int, source: str, since: float, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while self.answered_since(since, source) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers from {source}"
            time.sleep(0.05)


def test_cli_run_and_the_lookup_api_on_a_cluster(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    redis_cluster: RedisClusterServers,
    start_api: Any,
) -> None:
    summary_path = tmp_path / "summary.json"
    done = run_cli(
        "run", "--input", str(dataset), "--model", "models:/churn/2", "--key-column", KEY,
        "--store", redis_cluster.url, "--namespace", NS, "--summary-json", str(summary_path),
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["published"] is True and summary["rows"] == 12_000
    truth = expected(registry, dataset, "models:/churn/2")
    api = start_api(env, redis_cluster.url)
    for key, value in truth.items():
        answer = api.get(f"/v1/predictions/{NS}/{key}")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["source"] == "kv" and body["run_id"] == summary["run_id"]
        assert body["prediction"]["churn_probability"] == pytest.approx(value, rel=1e-5)
    batch = api.post(f"/v1/predictions/{NS}/batch", {"keys": [*map(str, KEYS), "42"]}).json()
    assert [r["status"] for r in batch["results"]] == ["found"] * len(KEYS) + ["not_found"]
    got = [r["prediction"]["churn_probability"] for r in batch["results"][:-1]]
    assert got == pytest.approx([truth[k] for k in KEYS], rel=1e-5)
    assert api.get("/readyz").json()["status"] == "ready"
    listed = run_cli("versions", NS, "--json", "--store", redis_cluster.url, env=env)
    assert json.loads(listed.stdout)["live"] == summary["version"], listed.stderr


def test_reshard_under_load_answers_every_lookup_right(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    own_cluster: RedisClusterServers,
    start_api: Any,
) -> None:
    manifest = run_job(dataset, "models:/churn/1", NS, store_url=own_cluster.url)
    truth = expected(registry, dataset, "models:/churn/1")
    api = start_api(env, own_cluster.url)
    moved = data_slots(manifest)
    with Load(api.base, truth) as load:
        load.wait_for(50, "kv", since=0)
        for slot in sorted(moved):
            # redis-cli moves a source's lowest slots first: as many as reach the data's
            # slot, so it moves under the load (its keys migrated with MIGRATE while
            # lookups get ASK, then MOVED once it is given); moved on again where that
            # leaves its new primary some slots.
            for move in range(2):
                source = own_cluster.port_of_slot(slot)
                owned = own_cluster.slots_of(source)
                count = owned.index(slot) + 1
                if count == len(owned):
                    assert move > 0, "the source would be left without slots"
                    break
                target = next(p.port for p in own_cluster.primaries() if p.port != source)
                own_cluster.reshard(count, source, target, pipeline=10)
                assert own_cluster.port_of_slot(slot) == target
        after = time.monotonic()
        load.wait_for(100, "kv", since=after)
    assert set(load.statuses) == {200}, load.statuses
    assert not load.wrong, load.wrong[:3]
    # Every answer from the store: the reader followed each redirection (a failed store
    # read would have been answered by the batch fallback, marked "batch").
    assert Counter(s for _, s in load.sources).keys() == {"kv"}, Counter(load.sources)


def test_a_primary_killed_while_serving_answers_from_the_store_or_the_batch_fallback(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    own_cluster: RedisClusterServers,
    start_api: Any,
) -> None:
    manifest = run_job(dataset, "models:/churn/1", NS, store_url=own_cluster.url)
    truth = expected(registry, dataset, "models:/churn/1")
    api = start_api(env, own_cluster.url)
    (data_slot,) = data_slots(manifest) - {key_slot(redis_state_key(NS))}
    with Load(api.base, truth) as load:
        load.wait_for(50, "kv", since=0)
        killed_at = time.monotonic()
        own_cluster.kill_primary(own_cluster.port_of_slot(data_slot))
        promoted_at = time.monotonic()
        load.wait_for(100, "kv", since=promoted_at)  # the promoted replica serves
    assert set(load.statuses) == {200}, load.statuses
    assert not load.wrong, load.wrong[:3]
    assert {s for _, s in load.sources} <= {"kv", "batch"}
    assert load.answered_since(killed_at, "batch") > 0, "no answer from the batch fallback"


@pytest.mark.parametrize("failover_seconds", [20.0, 0.0], ids=["waits", "gives-up"])
def test_an_export_during_a_failover_completes_or_leaves_the_live_version(
    own_cluster: RedisClusterServers, failover_seconds: float
) -> None:
    """Waiting for the failover (the default), the export completes with every key, on the
    promoted replica too; not waiting, it fails and the live version stays whole."""
    rows, step = 600_000, 100_000
    store = RedisClusterStore(own_cluster.url, failover_seconds=failover_seconds)

    def load(run: str, value: float, progress: threading.Event | None = None) -> int:
        info = store.begin_version("ns", new_version(run, rows))
        for start in range(0, rows, step):
            keys = to_text_keys(pa.array(np.arange(start, start + step)))
            store.write_columns("ns", info, keys, np.full((step, 1), value, np.float32))
            if progress is not None and start >= step:
                progress.set()
        return store.complete_version("ns", info.version, rows).version

    live = store.publish("ns", load("r1", 1.0), keep=3)
    outcome: list[object] = []
    progress = threading.Event()

    def export() -> None:
        try:
            outcome.append(store.publish("ns", load("r2", 2.0, progress), keep=3).version)
        except BaseException as exc:  # noqa: BLE001 - anything else fails the test below
            outcome.append(exc)

    exporter = threading.Thread(target=export)
    exporter.start()
    assert progress.wait(120), "the export made no progress"
    own_cluster.kill_primary()  # the first primary: about a third of every version's groups
    exporter.join(180)
    assert outcome, "the export neither completed nor failed"
    assert isinstance(outcome[0], (int, StoreUnavailable)), repr(outcome[0])
    after = open_store(own_cluster.url)
    state = after.state("ns")
    sample = encode_keys(range(0, rows, 997))
    if isinstance(outcome[0], StoreUnavailable):
        assert failover_seconds == 0.0, outcome[0]
        assert state.live == live.version
        info, value = state.live_info(), 1.0
    else:
        assert failover_seconds > 0, "an export went on through a lost primary without waiting"
        assert state.live == outcome[0] != live.version
        info, value = state.live_info(), 2.0
    assert info is not None
    assert after.get_many("ns", info, sample) == pack_values(np.full((len(sample), 1), value))
    after.close()
