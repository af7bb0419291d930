"""The stack as docker-compose.yaml deploys it, run for real without Docker.

Every service of the CPU stack runs its compose ``command`` with its compose
``environment`` (tests/stack.py reads both from the file and rewrites only host names,
ports and container paths for loopback): the machine's PostgreSQL with the databases and
roles of ``docker/postgres/init-databases.sh``, Redis with a password, the MLflow
tracking server on Postgres serving artifacts, a Dask scheduler with two preloaded
workers, Airflow's init steps then its api-server, scheduler, DAG processor and triggerer
as separate processes on Postgres with the LocalExecutor, and the lookup API with API keys.

A user's path through it: register a model folder through the MLflow server, set its
alias, trigger the ``batchscore`` DAG through REST API v2, read a prediction from the
lookup API.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from batchscore.samples import feature_names, train_model
from tests.conftest import KEY, N_FEATURES, direct_forward, read_rows, run_cli
from tests.stack import Deployment, base_environment, deploy, save_model_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.airflow,
    pytest.mark.redis,
    pytest.mark.timeout(1500),
]

MODEL = "stack_churn"
NAMESPACE = "stack"
KEYS = [1_000_000, 1_004_321, 1_011_999]  # batchscore.samples keys start at 1,000,000
RUN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Iterator[Deployment]:
    """The CPU stack, the dataset mounted as /data; stopped and its databases dropped."""
    for program in ("psql", "curl", "redis-server", "redis-cli"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is not installed: run `make system-deps stack-deps`")
    deployment = deploy(tmp_path_factory.mktemp("stack"), dataset)
    print(f"\nstack up: {deployment.loopback.ports}, logs in {deployment.stack.folder / 'logs'}")
    try:
        yield deployment
    finally:
        deployment.stop()


def user_env(stack: Deployment, home: Path) -> dict[str, str]:
    """A user's shell on the host: MLFLOW_TRACKING_URI at the published MLflow port."""
    return base_environment() | {
        "MLFLOW_TRACKING_URI": stack.tracking_uri,
        "BATCHSCORE_HOME": str(home),
    }


def test_a_model_registered_through_mlflow_is_scored_by_the_dag_and_served_with_a_key(
    stack: Deployment, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with stack.stack.report_failure():
        # The compose header's way: a model folder from the host, then the alias.
        model = train_model(N_FEATURES, seconds=0.3, seed=21)
        folder = save_model_folder(tmp_path / "my-model", model, N_FEATURES)
        env = user_env(stack, tmp_path / "user-home")
        registered = run_cli("model", "register", str(folder), "--name", MODEL, env=env)
        assert registered.returncode == 0, registered.stderr
        assert f"registered {MODEL} version 1" in registered.stdout
        shutil.rmtree(folder)  # the registered version lives in the server's artifact store
        promoted = run_cli("model", "promote", MODEL, "1", "--alias", "champion", env=env)
        assert promoted.returncode == 0, promoted.stderr

        # Airflow: the scheduled job starts paused, the ad-hoc DAG does not.
        airflow = stack.airflow()
        assert airflow.wait_for_dag("score_churn_daily", timeout=300)["is_paused"] is True
        assert airflow.wait_for_dag("batchscore", timeout=300)["is_paused"] is False
        conf = {
            "input_path": stack.loopback.text("/data"),  # what a user types: /data
            "model_uri": f"models:/{MODEL}@champion",
            "key_column": KEY,
            "namespace": NAMESPACE,
            "features": ",".join(feature_names(N_FEATURES)),  # a pt2 model's tensor input
        }
        run_id = airflow.trigger("batchscore", conf)
        airflow.wait_for_run("batchscore", run_id, timeout=RUN_TIMEOUT)
        states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("batchscore", run_id)}
        assert states.get("publish") == "success", states
        # scored by the stack's workers (BATCHSCORE_CLUSTER), not a cluster of the task's own
        (manifest,) = (stack.loopback.paths["/var/lib/batchscore"] / "runs").glob(
            "*/*/manifest.json"
        )
        recorded = json.loads(manifest.read_text())
        assert recorded["params"]["cluster"] == stack.loopback.text("tcp://dask-scheduler:8786")
        assert recorded["steps"]["score"]["rows_scored"] == 12_000

        # The lookup API, with the key from .env and without.
        api = stack.url("lookup-api", 8000)
        key = stack.values["LOOKUP_API_KEY"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)  # restored afterwards
        rows = read_rows(dataset, KEYS)
        expected = direct_forward(
            stack.tracking_uri, f"models:/{MODEL}/1", np.stack([rows[k] for k in KEYS])
        )
        for index, scored in enumerate(KEYS):
            answer = httpx.get(
                f"{api}/v1/predictions/{NAMESPACE}/{scored}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == {"name": MODEL, "version": "1"} and body["source"] == "kv"
            (value,) = body["prediction"].values()
            assert value == pytest.approx(float(expected[index, 0]), rel=1e-5, abs=1e-6)
        anonymous = httpx.get(f"{api}/v1/predictions/{NAMESPACE}/{KEYS[0]}", timeout=30)
        assert anonymous.status_code == 401, anonymous.text

        # The Dask dashboard renders (bokeh installed), on the scheduler's published port.
        dashboard = httpx.get(f"{stack.url('dask-scheduler', 8787)}/status", timeout=30)
        assert dashboard.status_code == 200, dashboard.text[:500]
        assert "bokeh" in dashboard.text.lower()


def test_the_pipeline_reached_redis_only_with_the_password(stack: Deployment) -> None:
    """Redis refuses a client without the password that BATCHSCORE_STORE_PASSWORD carries."""
    import redis

    port = stack.loopback.port("redis", 6379)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        redis.Redis(port=port).ping()
    assert redis.Redis(port=port, password=stack.values["REDIS_PASSWORD"]).ping()
    scheduler_env = stack.env("airflow-scheduler")
    assert scheduler_env["BATCHSCORE_STORE_PASSWORD"] == stack.values["REDIS_PASSWORD"]
    assert stack.values["REDIS_PASSWORD"] not in scheduler_env["BATCHSCORE_STORE_URL"]
