"""A job's notifier under real Airflow: ``airflow dags test`` runs that fail, mailed to a
real SMTP server (aiosmtpd, on a free port) through an Airflow SMTP connection.

Three job DAGs, each run once for 2026-11-20:

- ``score_no_column``: its input lacks the model's feature columns, so plan fails at
  once (no retry can fix it); it notifies on failures and gates;
- ``score_gated``: the ``broken`` model's outputs are NaN, so the validation gate blocks
  the run; it notifies on gates only;
- ``score_quiet``: the same missing columns as the first, but it notifies on gates only,
  so its failure sends nothing;
- ``score_slow``: a model that sleeps in every forward pass, and ``timeouts: {score: 3s}``:
  Airflow stops the score step when its ``execution_timeout`` passes, and the failure
  is mailed.
"""

from __future__ import annotations

import email
import html
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchscore.testing import free_port
from tests.conftest import BIN, KEY, N_FEATURES, REPO, Registry

pytestmark = [pytest.mark.airflow, pytest.mark.slow, pytest.mark.e2e]
DAGS = REPO / "dags"
DAY = "2026-11-20"
CONN_ID = "batchscore_mail"


class Mailbox:
    """An aiosmtpd handler that keeps every message it is handed."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((list(envelope.rcpt_tos), email.message_from_bytes(envelope.content)))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[Message]:
        return [message for rcpt, message in self.received if address in rcpt]


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Mailbox, int]]:
    from aiosmtpd.controller import Controller

    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


@dataclass
class Runs:
    env: dict[str, str]
    done: dict[str, subprocess.CompletedProcess[str]]

    def output(self, name: str) -> str:
        return self.done[name].stdout + self.done[name].stderr


def without_features(folder: Path) -> Path:
    """A Parquet input with the key column only: the model's features are missing."""
    folder.mkdir(parents=True)
    keys = np.arange(100, dtype=np.int64)
    pq.write_table(pa.table({KEY: keys}), folder / "part-0.parquet")
    return folder


def airflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "airflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    registry: Registry,
    dataset: Path,
    smtp: tuple[Mailbox, int],
) -> Runs:
    root = tmp_path_factory.mktemp("dag-notify")
    missing = without_features(root / "no-features")
    mail = {"smtp": {"from": "batchscore@example.com", "conn_id": CONN_ID}}

    def job(name: str, model: str, input_path: Path, to: str, when: list[str]) -> dict[str, Any]:
        notify = {"when": when, "smtp": mail["smtp"] | {"to": [to]}}
        return {
            "name": name,
            "namespace": name,
            "model_uri": model,
            "input_path": str(input_path),
            "key_column": KEY,
            "store_url": f"lmdb://{root / 'store'}",
            "retries": 0,
            "notify": notify,
        }

    jobs = root / "jobs"
    jobs.mkdir()
    configs = [
        job("no_column", "models:/churn@champion", missing, "ops@example.com", ["failure", "gate"]),
        job("gated", "models:/broken@champion", dataset, "quality@example.com", ["gate"]),
        job("quiet", "models:/churn@champion", missing, "quiet@example.com", ["gate"]),
        job("slow", "models:/slow@champion", dataset, "slow@example.com", ["failure"])
        | {"timeouts": {"score": "3s"}},
    ]
    register_slow_model(registry)
    for config in configs:
        (jobs / f"{config['name']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    _, port = smtp
    connection = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHSCORE_"))}
    env |= {
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(connection),
        "BATCHSCORE_HOME": str(root / "home"),
        "BATCHSCORE_WORKERS": "1",
        "BATCHSCORE_SHARD_ROWS": "4000",
        "BATCHSCORE_DAG_JOBS_DIR": str(jobs),
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
        "PYTHONPATH": str(REPO),  # the Dask workers unpickle tests.slow_model.SlowMLP
    }
    migrated = airflow(env, "db", "migrate")
    assert migrated.returncode == 0, (migrated.stdout + migrated.stderr)[-5000:]
    pool = airflow(env, "pools", "set", "batchscore_scoring", "1", "batchscore scoring")
    assert pool.returncode == 0, pool.stderr[-3000:]
    # As the DAG processor stores them for the scheduler: the notifier serializes too.
    stored = airflow(env, "dags", "reserialize")
    assert stored.returncode == 0, (stored.stdout + stored.stderr)[-5000:]
    done = {c["name"]: airflow(env, "dags", "test", f"score_{c['name']}", DAY) for c in configs}
    return Runs(env, done)


def register_slow_model(registry: Registry) -> None:
    """``models:/slow@champion``: one forward pass takes 30 s, ten times the limit."""
    from batchscore.samples import log_and_register
    from tests.slow_model import SlowMLP

    log_and_register(
        SlowMLP(N_FEATURES, seconds_per_call=30.0).eval(),
        tracking_uri=registry.tracking_uri,
        artifact_root=registry.artifact_root,
        name="slow",
        n_features=N_FEATURES,
    )


def html_of(message: Message) -> str:
    [part] = [p for p in message.walk() if p.get_content_type() == "text/html"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return html.unescape(payload.decode(part.get_content_charset() or "utf-8"))


def run_id_of(env: dict[str, str], dag_id: str) -> str:
    """The DAG run's id, as Airflow's database has it."""
    code = (
        "import json, sys; from sqlalchemy import select; "
        "from airflow.models.dagrun import DagRun; "
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    ids = s.scalars(select(DagRun.run_id).where(DagRun.dag_id == sys.argv[1])).all()\n"
        "print(json.dumps(list(ids)))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code, dag_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [run_id] = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(run_id, str)
    return run_id


def test_a_failed_step_is_mailed_with_dag_task_run_and_error(
    runs: Runs, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, _ = smtp
    assert runs.done["no_column"].returncode != 0, runs.output("no_column")[-5000:]
    [message] = mailbox.to("ops@example.com")
    run_id = run_id_of(runs.env, "score_no_column")
    assert message["From"] == "batchscore@example.com"
    assert message["Subject"] == (
        f"[batchscore] step 'plan' failed: DAG score_no_column, run {run_id}"
    )
    body = html_of(message)
    assert "Step 'plan' failed and will not be retried." in body
    for shown in ("score_no_column", "plan", run_id):
        assert f"<pre>{shown}</pre>" in body
    assert "<pre>MissingColumn: " in body, body


def test_a_blocked_gate_is_mailed_as_a_gate_not_a_failure(
    runs: Runs, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, _ = smtp
    assert runs.done["gated"].returncode != 0, runs.output("gated")[-5000:]
    [message] = mailbox.to("quality@example.com")
    run_id = run_id_of(runs.env, "score_gated")
    assert message["Subject"] == (
        f"[batchscore] validation gate blocked DAG score_gated, run {run_id}: nothing was published"
    )
    body = html_of(message)
    assert "The validation gate blocked this run: its output was not published." in body
    assert "<pre>validate</pre>" in body and f"<pre>{run_id}</pre>" in body
    assert "ValidationFailed:" in body and "churn_probability" in body


def test_a_job_that_wants_gates_only_hears_nothing_of_a_failure(
    runs: Runs, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, _ = smtp
    assert runs.done["quiet"].returncode != 0
    assert "batchscore: step 'plan' of DAG score_quiet" in runs.output("quiet")
    assert mailbox.to("quiet@example.com") == []


def test_a_step_past_its_execution_timeout_is_stopped_and_mailed(
    runs: Runs, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, _ = smtp
    output = runs.output("slow")
    assert runs.done["slow"].returncode != 0, output[-5000:]
    assert "batchscore: step 'score' of DAG score_slow" in output, output[-5000:]
    [message] = mailbox.to("slow@example.com")
    assert message["Subject"].startswith("[batchscore] step 'score' failed: DAG score_slow")
    assert "<pre>AirflowTaskTimeout: " in html_of(message), html_of(message)


def test_the_stored_dag_keeps_each_steps_timeout_and_its_failure_callbacks(runs: Runs) -> None:
    """What the scheduler and the workers get: the serialized DAG in Airflow's database."""
    code = (
        "import json, sys; from airflow.models.serialized_dag import SerializedDagModel; "
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    dag = SerializedDagModel.get_dag(sys.argv[1], session=s)\n"
        "print(json.dumps({t.task_id: [t.execution_timeout and t.execution_timeout.seconds, "
        "t.has_on_failure_callback] for t in dag.tasks}))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code, "score_slow"],
        env=runs.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = json.loads(done.stdout.strip().splitlines()[-1])
    steps = ("resolve", "plan", "score", "validate", "export", "publish", "reports")
    assert tasks == {step: [3 if step == "score" else None, True] for step in steps}
