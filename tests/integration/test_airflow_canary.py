"""A job config's staged publish under ``airflow standalone`` (issue 21): the DAG publishes
the run's version as a canary, holds in the triggerer (a deferred sensor, no worker slot),
checks the canary (drift from the live version on its keys; the lookup API's answers for
it from ``/metrics``), then promotes it or aborts it. Both paths, on one namespace whose
live version was published by ``batchscore run``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from kv_export.store import open_store
from tests.conftest import KEY, ApiProcess, run_cli
from tests.integration.test_quality_gates import variants  # noqa: F401  (a fixture)

if TYPE_CHECKING:
    from tests.airflow_server import AirflowSetup

pytest_plugins = ["tests.airflow_server"]
pytestmark = [pytest.mark.airflow, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]
NS = "staged_dag"


def staged_job(name: str, model_uri: str, store_url: str, dataset: Path, **canary: Any) -> str:
    return yaml.safe_dump(
        {
            "name": name,
            "namespace": NS,
            "model_uri": model_uri,
            "input_path": str(dataset),
            "key_column": KEY,
            "store_url": store_url,
            "schedule": None,
            "retries": 0,
            "canary": canary,
        },
        sort_keys=False,
    )


def cli_env(airflow: AirflowSetup) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSCORE_", "AIRFLOW"))}
    return base | airflow.run_env


def test_a_staged_publish_is_aborted_or_promoted_by_its_check(
    airflow: AirflowSetup,
    dataset: Path,
    variants: dict[str, str],  # noqa: F811
    start_api: Callable[[dict[str, str], str], ApiProcess],
) -> None:
    server = airflow.server
    store_url = f"lmdb://{airflow.scratch / 'staged-store'}"
    live = run_cli(
        *("run", "--input", str(dataset), "--model", "models:/churn/1", "--key-column", KEY),
        *("--namespace", NS, "--store", store_url),
        env=cli_env(airflow),
    )
    assert live.returncode == 0, live.stderr
    store = open_store(store_url)
    base = store.state(NS).live
    assert base is not None

    api = start_api(server.env, store_url)
    jobs_dir = Path(airflow.run_env["BATCHSCORE_DAG_JOBS_DIR"])
    small = variants["churn_small"]
    # Any difference at all is too much for this one: the check aborts the canary.
    (jobs_dir / "staged_strict.yaml").write_text(
        staged_job(
            "staged_strict", small, store_url, dataset, percent=20, hold="1s", max_mean_drift=1e-9
        )
    )
    # This one holds 20 s, counts the API's answers for the canary, and promotes it.
    (jobs_dir / "staged_ok.yaml").write_text(
        staged_job(
            "staged_ok",
            small,
            store_url,
            dataset,
            percent=20,
            hold="20s",
            max_mean_drift=0.5,
            api_url=api.base,
            max_error_rate=0.0,
            max_not_found_rate=0.5,
            min_answers=1,
        )
    )

    strict = "score_staged_strict"
    server.wait_for_dag(strict)
    server.unpause(strict)
    run_id = server.trigger(strict, {})
    server.wait_for_run(strict, run_id, expected="failed")
    states = {ti["task_id"]: ti["state"] for ti in server.task_instances(strict, run_id)}
    assert states["publish"] == "success" and states["hold_canary"] == "success", states
    assert states["settle_canary"] == "failed", states
    log = server.task_log(strict, run_id, "settle_canary", 1)
    assert "aborted: mean_abs_diff" in log and "above max_mean_drift 1e-09" in log, log[-3000:]
    state = store.state(NS)
    assert state.live == base and state.canary is None  # aborted: the live version stays

    ok = "score_staged_ok"
    server.wait_for_dag(ok)
    server.unpause(ok)
    run_id = server.trigger(ok, {})
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def look_up() -> None:  # traffic during the hold, some of it answered by the canary
        keys = [str(k) for k in range(1_000_000, 1_012_000, 37)]
        while not stop.is_set():
            answer = httpx.post(f"{api.base}/v1/predictions/{NS}/batch", json={"keys": keys})
            if answer.status_code == 200:
                seen.extend(r for r in answer.json()["results"] if r["canary"])
            time.sleep(0.5)

    traffic = threading.Thread(target=look_up)
    traffic.start()
    try:
        deferred = False
        deadline = time.monotonic() + 300
        while server.run_state(ok, run_id) not in ("success", "failed"):
            assert time.monotonic() < deadline, "the staged run did not end"
            tis = {ti["task_id"]: ti["state"] for ti in server.task_instances(ok, run_id)}
            deferred = deferred or tis.get("hold_canary") == "deferred"
            time.sleep(1)
    finally:
        stop.set()
        traffic.join()
    server.wait_for_run(ok, run_id)  # success, or the failed tasks' logs
    assert deferred, "the hold never showed as deferred (waiting in the triggerer)"
    assert seen and {r["status"] for r in seen} == {"found"}
    state = store.state(NS)
    assert state.canary is None and state.live is not None and state.live != base
    info = state.live_info()
    assert info is not None and info.model_name == "churn_small"
    assert state.history[-2:] == [base, state.live]
