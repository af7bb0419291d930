"""``/metrics`` of ``batchscore serve --workers 2`` shows the whole server, whichever worker
answers the scrape: real worker processes on a real embedded store, real HTTP.

Which worker served what is read from the per-process files of prometheus_client's
multiprocess mode (``counter_<pid>.db``), so the tests know that both workers served
lookups without trusting the merged scrape they check.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ApiProcess, run_cli
from tests.integration.test_api_service import (
    KEYS,
    NS,
    Start,
    check,
    get,
    wait_for,
    worker_pids,
    write_version,
)

pytestmark = [pytest.mark.slow]
LOOKUP = "/v1/predictions/{namespace}/{key}"


def served_by_process(folder: Path) -> dict[int, float]:
    """Lookups answered by each process, from its own counter file."""
    served: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            if metric.name == "batchscore_lookup_responses":
                pid = int(path.stem.split("_")[1])
                served[pid] = sum(s.value for s in metric.samples if s.labels["route"] == LOOKUP)
    return served


def lookups_until_every_worker_served(api: ApiProcess, folder: Path, workers: set[int]) -> int:
    """Lookups on new connections, 40 at a time, until each worker has answered some;
    returns how many were sent (all answered 200, all counted by their worker)."""
    key = int(KEYS[7])
    sent = 0

    def lookup(_: int) -> httpx.Response:
        return get(api, f"/v1/predictions/{NS}/{key}")

    with ThreadPoolExecutor(8) as pool:
        while True:
            answers = list(pool.map(lookup, range(40)))
            assert [a.status_code for a in answers] == [200] * len(answers)
            check(answers[-1].json(), key, "1", "kv")
            sent += len(answers)
            served = served_by_process(folder)
            if set(served) == workers and all(served.values()):
                break
            assert sent < 4000, f"the kernel gave every connection to one worker: {served}"
    # A worker counts a request just after sending its answer: let the last ones land.
    wait_for(lambda: sum(served_by_process(folder).values()) == sent, seconds=5)
    return sent


def scrape(api: ApiProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """One scrape (a new connection), as {sample name: {sorted labels: value}}."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(get(api, "/metrics").text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def lookups_counted(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> float:
    responses = samples["batchscore_lookup_responses_total"]
    return sum(value for labels, value in responses.items() if ("route", LOOKUP) in labels)


def counts(api: ApiProcess, lookups: int) -> bool:
    return lookups_counted(scrape(api)) == lookups


def metrics_folder(tmp: Path) -> Path:
    folders = list(tmp.glob("batchscore-metrics-*"))
    assert len(folders) == 1, folders
    return folders[0]


def test_one_scrape_counts_the_requests_of_every_worker(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    tmp = tmp_path / "tmp"  # where serve makes its private metrics folder
    tmp.mkdir()
    env = api_env | {"BATCHSCORE_API_WORKERS": "2", "TMPDIR": str(tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    api = start_api(env, store_url)
    workers = worker_pids(api)
    assert len(workers) == 2
    folder = metrics_folder(tmp)
    assert folder.stat().st_mode & 0o077 == 0  # private to the user

    sent = lookups_until_every_worker_served(api, folder, workers)

    for _ in range(6):  # new connections: either worker may answer each
        samples = scrape(api)
        assert lookups_counted(samples) == sent
        histogram = samples["batchscore_lookup_request_seconds_count"]
        assert histogram[(("route", LOOKUP), ("source", "kv"))] == sent
        assert samples["batchscore_live_version"] == {(("namespace", NS),): 1.0}
        (age,) = samples["batchscore_live_version_age_seconds"].values()
        assert 0 <= age < 600
        breaker = samples["batchscore_store_circuit_state"]
        assert breaker == {
            (("state", "closed"),): 2.0,  # both workers' breakers are closed
            (("state", "half-opened"),): 0.0,
            (("state", "opened"),): 0.0,
        }

    api.stop()
    assert not folder.exists()  # removed at exit, counts never carry over to another run


def test_a_single_worker_shows_the_same_metrics(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    """Same requests to one worker (in-memory registry) and to two (shared files): the same
    metric families with the same labels; only the ``_created`` samples of the in-memory
    counters have no counterpart in multiprocess mode."""
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    env = {k: v for k, v in api_env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    shapes = []
    for workers in ("1", "2"):
        api = start_api(env | {"BATCHSCORE_API_WORKERS": workers}, store_url)
        assert get(api, f"/v1/predictions/{NS}/{int(KEYS[3])}").status_code == 200
        assert get(api, f"/v1/predictions/{NS}/42").status_code == 404
        wait_for(partial(counts, api, 2), seconds=5)
        shapes.append(
            {
                (name, tuple(sorted({key for labels in series for key, _ in labels})))
                for name, series in scrape(api).items()
                if not name.endswith("_created")
            }
        )
        api.stop()
    assert shapes[0] == shapes[1]


def test_a_killed_worker_still_counts_and_is_not_counted_running(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    """The user's own PROMETHEUS_MULTIPROC_DIR is used and left in place. A worker killed
    outright (no shutdown of its own) is replaced by uvicorn: what it served is still
    counted, its breaker state is not (the scrape forgets a worker whose process is gone),
    and workers stopped gracefully remove their per-process gauges themselves."""
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = api_env | {"BATCHSCORE_API_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    api = start_api(env, store_url)
    workers = worker_pids(api)
    sent = lookups_until_every_worker_served(api, folder, workers)

    killed = min(workers)
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(api)) == 2 and killed not in worker_pids(api))
    (replacement,) = worker_pids(api) - workers
    wait_for(lambda: (folder / f"gauge_livesum_{replacement}.db").exists())  # it is serving

    samples = scrape(api)
    assert lookups_counted(samples) == sent
    assert samples["batchscore_store_circuit_state"][(("state", "closed"),)] == 2.0
    assert not list(folder.glob(f"gauge_live*_{killed}.db"))

    api.stop()
    assert folder.is_dir() and list(folder.glob("counter_*.db"))  # the user's, kept
    assert not list(folder.glob("gauge_livesum_*.db"))  # each worker marked itself dead


def test_a_metrics_folder_that_does_not_exist_stops_serve_before_it_binds(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS, "1")
    missing = tmp_path / "missing"
    env = api_env | {"PROMETHEUS_MULTIPROC_DIR": str(missing)}
    for workers in ("1", "2"):
        done = run_cli("serve", "--store", store_url, "--workers", workers, env=env, timeout=60)
        assert done.returncode != 0
        assert f"PROMETHEUS_MULTIPROC_DIR='{missing}' is not a folder" in done.stdout + done.stderr
