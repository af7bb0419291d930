"""A real ``airflow standalone`` for the integration tests, started once per session.

The REST test and the browser test share one server (``pytest_plugins =
["tests.airflow_server"]`` in each module registers the fixture once). It runs on SQLite
in a temporary AIRFLOW_HOME with this repository's ``dags/`` folder, on a free port, and
its task processes inherit the environment of a run: the session's MLflow registry, a
BATCHSCORE_HOME of their own, one Dask worker, small shards.

Its output goes to ``standalone.log`` in AIRFLOW_HOME (under pytest's tmp dir); a failed
start prints the tail of that log, a failed DAG run the logs of its failed tasks, fetched
through the REST API as a user would. The whole process group (scheduler, DAG processor,
API server, triggerer, task and Dask processes) is stopped at the end of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from batchscore.testing import ServiceError, free_port, stop_process_groups, tail
from tests.conftest import BIN, KEY, REPO, Registry

DAGS = REPO / "dags"
JOBS_DIR_VARIABLE = "BATCHSCORE_DAG_JOBS_DIR"
# Far above what an idle machine needs: other tests (Dask clusters, redis-servers, other
# Airflows) share the cores, and a slow start or run is not what these tests check.
START_TIMEOUT = 240.0
RUN_TIMEOUT = 300.0
TERMINAL_STATES = {"success", "failed"}
# Pools that the DAGs' tasks use (the score task's bounds concurrent scoring runs), set up
# as a deployment (or `make demo`) does: a task in a missing pool is never scheduled.
POOLS = {"batchscore_scoring": 1}


class AirflowStartError(ServiceError):
    """``airflow standalone`` did not become healthy; the message carries its log's tail."""


class DagRunFailed(AssertionError):
    """A DAG run ended in another state than the one expected; carries its failed tasks' logs."""


def airflow_env(home: Path, port: int, run_env: dict[str, str]) -> dict[str, str]:
    """The environment of ``airflow standalone``; its components and tasks inherit it.

    Inherited AIRFLOW_* and BATCHSCORE_* variables are dropped so that the server sees
    only what the tests set (settings reject unknown BATCHSCORE_* names).
    """
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW_", "AIRFLOW__", "BATCHSCORE_"))
    }
    python_path = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    return (
        base
        | run_env
        | {
            # standalone starts its components as `airflow ...` found on PATH
            "PATH": os.pathsep.join([str(BIN), base.get("PATH", "")]),
            "PYTHONPATH": python_path,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            # Tasks reach the execution API through base_url (default http://localhost:8080).
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            # LocalExecutor and the triggerer serve task logs on fixed ports by default;
            # free ones let this server run beside another Airflow on the machine.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "NO_COLOR": "1",
        }
    )


class RestApiV2:
    """A small REST API v2 client of a running Airflow, whichever way it was started.

    A subclass gives ``base``, ``username``, ``password`` and a ``_token`` attribute, and
    says whether its processes still run (``check_alive``) and what they logged
    (``log_tail``): ``AirflowServer`` here for ``airflow standalone``, the stack test's
    client for api-server, scheduler, DAG processor and triggerer run apart.
    """

    username: str
    _token: str | None

    @property
    def base(self) -> str:
        raise NotImplementedError

    @property
    def password(self) -> str:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise ``AirflowStartError`` with the log's tail when a process has exited."""
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError

    def token(self) -> str:
        if self._token is None:
            answer = httpx.post(
                f"{self.base}/auth/token",
                json={"username": self.username, "password": self.password},
                timeout=30,
            )
            assert answer.status_code in (200, 201), answer.text
            self._token = str(answer.json()["access_token"])
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token()}"} | kwargs.pop("headers", {})
        return httpx.request(
            method, f"{self.base}/api/v2{path}", headers=headers, timeout=30, **kwargs
        )

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until the DAG processor has parsed ``dag_id``; fail with the import errors."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            found = self.api("GET", f"/dags/{dag_id}")
            if found.status_code == 200:
                return dict(found.json())
            time.sleep(2)
        errors = self.api("GET", "/importErrors").json()
        raise AssertionError(
            f"DAG {dag_id!r} did not appear within {timeout:.0f} s; import errors: "
            f"{json.dumps(errors, indent=1)}\n{self.log_tail()}"
        )

    def set_pool(self, name: str, slots: int) -> None:
        body = {"name": name, "slots": slots, "description": "set up by the tests"}
        answer = self.api("POST", "/pools", json=body)
        assert answer.status_code == 201, f"pool {name}: {answer.status_code} {answer.text}"

    def unpause(self, dag_id: str) -> None:
        answer = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        assert answer.status_code == 200, answer.text
        assert answer.json()["is_paused"] is False

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Trigger a run through REST API v2 and return its run id."""
        answer = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        assert answer.status_code == 200, f"trigger {dag_id}: {answer.status_code} {answer.text}"
        return str(answer.json()["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        assert answer.status_code == 200, answer.text
        return str(answer.json()["state"])

    def wait_for_run(
        self, dag_id: str, run_id: str, expected: str = "success", timeout: float = RUN_TIMEOUT
    ) -> None:
        """Poll until the run ends; anything but ``expected`` fails with the tasks' logs."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            self.check_alive()
            state = self.run_state(dag_id, run_id)
            if state in TERMINAL_STATES:
                break
            time.sleep(3)
        if state != expected:
            raise DagRunFailed(
                f"DAG run {dag_id}/{run_id} is {state!r} after waiting up to {timeout:.0f} s "
                f"(expected {expected!r})\n{self.describe_run(dag_id, run_id)}"
            )

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert answer.status_code == 200, answer.text
        return list(answer.json()["task_instances"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        answer = self.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
            headers={"Accept": "application/json"},
        )
        if answer.status_code != 200:
            return f"(log not available: {answer.status_code} {answer.text})"
        return "\n".join(format_log_line(line) for line in answer.json()["content"])

    def describe_run(self, dag_id: str, run_id: str) -> str:
        """Each task's state, and the full log of every try of each task that did not succeed."""
        parts = []
        tasks = self.task_instances(dag_id, run_id)
        parts.append("tasks: " + ", ".join(f"{ti['task_id']}={ti['state']}" for ti in tasks))
        for ti in tasks:
            if ti["state"] in ("success", "skipped", None, "upstream_failed"):
                continue
            for attempt in range(1, int(ti["try_number"] or 0) + 1):
                parts.append(f"--- log of {ti['task_id']}, try {attempt} ---")
                parts.append(self.task_log(dag_id, run_id, ti["task_id"], attempt)[-8000:])
        return "\n".join(parts)


@dataclass
class AirflowServer(RestApiV2):
    """A running ``airflow standalone`` and a small REST API v2 client for it."""

    home: Path
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]
    username: str = "admin"
    _password: str | None = field(default=None, repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password(self) -> str:
        """The admin password that SimpleAuthManager generated on first start."""
        if self._password is None:
            generated = self.home / "simple_auth_manager_passwords.json.generated"
            self._password = str(json.loads(generated.read_text())[self.username])
        return self._password

    def log_tail(self) -> str:
        return f"--- {self.log} ---\n{tail(self.log)}"

    def callback_log(self, dag_id: str, run_id: str) -> str:
        """What the executor's callbacks of a run (Deadline Alerts) logged, all files."""
        folder = self.home / "logs" / "executor_callbacks" / dag_id / run_id
        files = sorted(folder.rglob("*")) if folder.is_dir() else []
        return "".join(f.read_text(errors="replace") for f in files if f.is_file())

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise AirflowStartError(
                f"airflow standalone exited with {code}\n--- {self.log} ---\n{tail(self.log)}"
            )

    def stop(self) -> None:
        """Stop the whole process group: TERM, then KILL whatever is left after 30 s."""
        stop_process_groups([self.process], grace=30)


def format_log_line(line: Any) -> str:
    if not isinstance(line, dict):
        return str(line)
    text = " ".join(str(line.get(k) or "") for k in ("timestamp", "level", "event")).strip()
    if line.get("error_detail"):
        text += "\n" + json.dumps(line["error_detail"], indent=1)[-4000:]
    return text


def start_airflow(
    home: Path, run_env: dict[str, str], timeout: float = START_TIMEOUT
) -> AirflowServer:
    """Start ``airflow standalone`` in its own process group and wait until it is healthy."""
    port = free_port()
    env = airflow_env(home, port, run_env)
    log = home / "standalone.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=env,
            cwd=home,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = AirflowServer(home=home, port=port, env=env, log=log, process=process)
    try:
        wait_until_healthy(server, timeout)
        for name, slots in POOLS.items():
            server.set_pool(name, slots)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_healthy(server: RestApiV2, timeout: float) -> None:
    """Health = the API answers and metadatabase, scheduler, DAG processor, triggerer are
    healthy."""
    started = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - started < timeout:
        server.check_alive()
        try:
            answer = httpx.get(f"{server.base}/api/v2/monitor/health", timeout=5)
            last = f"{answer.status_code} {answer.text}"
            if answer.status_code == 200:
                health = answer.json()
                parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
                if all((health.get(p) or {}).get("status") == "healthy" for p in parts):
                    return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AirflowStartError(
        f"Airflow was not healthy after {timeout:.0f} s (last health answer: "
        f"{last})\n{server.log_tail()}"
    )


@dataclass(frozen=True)
class DagJob:
    """A DAG to trigger and the ``conf`` that makes it score the test dataset into ``store_url``."""

    dag_id: str
    conf: dict[str, Any]
    namespace: str
    store_url: str


@dataclass(frozen=True)
class AirflowSetup:
    """What the tests need to know about the server and the runs' environment."""

    server: AirflowServer
    run_env: dict[str, str]
    scratch: Path
    rest_job: DagJob


def run_environment(registry: Registry, batchscore_home: Path) -> dict[str, str]:
    """The scoring tasks' environment, like the ``env`` fixture's but for the session."""
    return {
        "BATCHSCORE_HOME": str(batchscore_home),
        "BATCHSCORE_WORKERS": "1",
        "BATCHSCORE_SHARD_ROWS": "2000",
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
    }


def generated_dags_available() -> bool:
    """Whether ``score_<name>`` DAGs are generated from job configs (``dags/jobs/*.yaml``).

    Also requires that the settings know BATCHSCORE_DAG_JOBS_DIR: an unknown BATCHSCORE_*
    name in the tasks' environment would fail every task.
    """
    from batchscore.core import settings

    dag_settings = getattr(settings, "DagSettings", None)
    knows_jobs_dir = dag_settings is not None and "dag_jobs_dir" in dag_settings.model_fields
    return knows_jobs_dir and (DAGS / "jobs").is_dir()


def rest_job(dataset: Path, scratch: Path, run_env: dict[str, str]) -> DagJob:
    """The REST test's job: a job config of its own when DAGs are generated from configs.

    Then the config (in a folder that BATCHSCORE_DAG_JOBS_DIR points at) carries every
    setting and the run needs no ``conf``; otherwise the generic ``batchscore`` DAG gets
    the same settings as its ``conf``.
    """
    store_url = f"lmdb://{scratch / 'rest-store'}"
    job = {
        "name": "airflow_rest",
        "namespace": "rest",
        "model_uri": "models:/churn@champion",
        "input_path": str(dataset),
        "key_column": KEY,
        "store_url": store_url,
        "schedule": None,
        "retries": 0,  # a failure shows at once, with its log
        "deadline": "2s",  # always missed: its alert is tested too
    }
    if not generated_dags_available():
        conf = {k: job[k] for k in ("input_path", "model_uri", "key_column", "namespace")}
        return DagJob("batchscore", conf | {"store_url": store_url}, "rest", store_url)
    jobs_dir = scratch / "jobs"
    jobs_dir.mkdir()
    (jobs_dir / "airflow_rest.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    run_env[JOBS_DIR_VARIABLE] = str(jobs_dir)
    return DagJob("score_airflow_rest", {}, "rest", store_url)


@pytest.fixture(scope="session")
def airflow(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, dataset: Path
) -> Iterator[AirflowSetup]:
    """One ``airflow standalone`` for the session, stopped (process group) at its end."""
    home = tmp_path_factory.mktemp("airflow-standalone")
    scratch = tmp_path_factory.mktemp("airflow-runs")
    run_env = run_environment(registry, scratch / "home")
    job = rest_job(dataset, scratch, run_env)
    server = start_airflow(home, run_env)
    print(f"\nairflow standalone on {server.base}, AIRFLOW_HOME={home}, log {server.log}")
    try:
        yield AirflowSetup(server=server, run_env=run_env, scratch=scratch, rest_job=job)
    finally:
        server.stop()
