"""The pipeline under a running Airflow: ``airflow standalone``, driven through REST API v2.

The DAG is unpaused and triggered with a ``conf`` as a user or another system would do
it; the run's tasks execute in Airflow's own task processes (LocalExecutor). The test
then serves the store that the run published with the lookup API and checks that a key
returns what the registered model computes for that row. The job's deadline (2 s) is
always missed: the scheduler's Deadline Alert must call the job's callback, whose line
in the executor's callback log names the run and the step it was in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.conftest import ApiProcess, Registry, direct_forward, read_rows

if TYPE_CHECKING:  # imported by pytest_plugins, so that pytest rewrites its asserts
    from tests.airflow_server import AirflowSetup

pytest_plugins = ["tests.airflow_server"]
# Above the harness's own deadlines (server start, DAG parse, run), which fail with the
# server's log or the failed tasks' logs rather than a bare pytest-timeout stack dump.
pytestmark = [pytest.mark.airflow, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]

KEYS = [1_000_003, 1_011_998]


def test_rest_triggered_run_publishes_what_the_model_computes(
    airflow: AirflowSetup,
    dataset: Path,
    registry: Registry,
    start_api: Callable[[dict[str, str], str], ApiProcess],
) -> None:
    server, job = airflow.server, airflow.rest_job
    dag_id = job.dag_id
    server.wait_for_dag(dag_id)
    server.unpause(dag_id)

    run_id = server.trigger(dag_id, job.conf)
    server.wait_for_run(dag_id, run_id)

    states = {ti["task_id"]: ti["state"] for ti in server.task_instances(dag_id, run_id)}
    assert "publish" in states and set(states.values()) == {"success"}, states
    api = start_api(server.env, job.store_url)
    described = api.get(f"/v1/namespaces/{job.namespace}")
    assert described.status_code == 200, described.text
    assert described.json()["key_count"] == 12_000
    run = described.json()["run_id"]  # derived from the DAG run, made safe for a folder name
    assert run.startswith(f"{dag_id}__") and run_id.startswith("manual__")

    rows = read_rows(dataset, KEYS)
    for key in KEYS:
        answer = api.get(f"/v1/predictions/{job.namespace}/{key}")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"]["name"] == "churn" and body["source"] == "kv"
        assert body["run_id"] == run
        # the model the run pinned (the alias may move during the session)
        expected = direct_forward(
            registry.tracking_uri,
            f"models:/churn/{body['model']['version']}",
            np.stack([rows[key]]),
        )
        assert body["prediction"]["churn_probability"] == pytest.approx(
            float(np.asarray(expected)[0, 0]), rel=1e-5, abs=1e-6
        )


def test_a_run_past_its_deadline_is_reported_by_the_deadline_alert(airflow: AirflowSetup) -> None:
    server, job = airflow.server, airflow.rest_job
    dag_id = job.dag_id
    server.wait_for_dag(dag_id)
    server.unpause(dag_id)
    run_id = server.trigger(dag_id, job.conf)
    server.wait_for_run(dag_id, run_id)  # the alert does not stop the run
    waited = time.monotonic() + 60
    while "is late" not in (logged := server.callback_log(dag_id, run_id)):
        assert time.monotonic() < waited, f"no Deadline Alert for {run_id}:\n{logged}"
        time.sleep(1)
    line = next(x for x in logged.splitlines() if "is late" in x)
    assert f"batchscore: run {run_id} of DAG {dag_id} is late: its deadline" in line
    assert "passed while it is in step '" in line and "(steps done: " in line
