"""Job-config DAGs under real Airflow (``airflow dags test`` on SQLite), MLflow and Dask.

One module-scoped scenario drives the DAGs as an operator would, then each test checks
one behaviour against what the runs left in the store, the run folders and Airflow's
database. The runs, in order (the dataset has one ``dt=`` partition per day, 4,000 rows
each, with keys of their own):

1. ``score_daily`` for 2026-11-20, job defaults → version 1, from ``dt=2026-11-20``;
2. ``score_daily`` for 2026-11-21 with form values (model pinned to version 2, batch
   size 256, force) → version 2, from ``dt=2026-11-21``;
3. ``score_daily`` for 2026-11-20 again: the same run; nothing is scored or published;
4. ``score_daily_challenger`` (``shadow: challenger``) for 2026-11-21 → an unpublished
   version 3 and a comparison with live version 2;
5. ``score_broken`` (an unknown model alias, 3 retries) fails on its first try.

Before them the DAGs are serialized (``airflow dags reserialize``), the pool is created
and ``score_after_daily`` (scheduled on the asset ``batchscore://daily``) is unpaused, so
the publishes queue a run of it, as the scheduler would then start.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.manifest import load_manifest
from kv_export.store import open_store
from tests.conftest import BIN, KEY, REPO, Registry, client_alias

pytestmark = [pytest.mark.airflow, pytest.mark.slow, pytest.mark.e2e]
DAGS = REPO / "dags"
DAY1, DAY2 = "2026-11-20", "2026-11-21"
STEPS = ["resolve", "plan", "score", "validate", "export", "publish"]


@dataclass
class Scenario:
    home: Path  # BATCHSCORE_HOME
    store_url: str
    jobs: Path
    env: dict[str, str]
    runs: dict[str, subprocess.CompletedProcess[str]]

    def output(self, name: str) -> str:
        done = self.runs[name]
        return done.stdout + done.stderr

    def run_dir(self, namespace: str, run_id: str) -> Path:
        return self.home / "runs" / namespace / run_id


def job(name: str, dataset: Path, store_url: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "daily",
        "model_uri": "models:/churn@champion",
        "input_path": f"{dataset}/dt={{{{ ds }}}}",
        "key_column": KEY,
        "store_url": store_url,
        "retries": 0,
    } | fields


def airflow(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "airflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def checked(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, dataset: Path
) -> Scenario:
    root = tmp_path_factory.mktemp("dag-jobs")
    store_url = f"lmdb://{root / 'store'}"
    jobs = root / "jobs"
    jobs.mkdir()
    configs = {
        "daily": job(
            "daily",
            dataset,
            store_url,
            schedule="0 0 * * *",
            start_date=DAY1,
            catchup=True,
            max_active_runs=2,
            tags=["test"],
        ),
        "daily_challenger": job("daily_challenger", dataset, store_url, shadow="challenger"),
        "after_daily": job(
            "after_daily",
            dataset,
            store_url,
            namespace="after_daily",
            input_path=f"{dataset}/dt={DAY2}",
            schedule={"asset": "batchscore://daily"},
        ),
        "broken": job(
            "broken",
            dataset,
            store_url,
            model_uri="models:/churn@no_such_alias",
            retries=3,
            retry_delay="10m",  # were it retried, the run would outlast the test
        ),
    }
    for name, fields in configs.items():
        (jobs / f"{name}.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))
    (jobs / "bad.yaml").write_text("name: bad\nmodel_uri: churn\nbatch_size: lots\n")
    client_alias("churn", "1", registry.tracking_uri, alias="challenger")

    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHSCORE_"))}
    env |= {
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BATCHSCORE_HOME": str(home),
        "BATCHSCORE_WORKERS": "1",
        "BATCHSCORE_SHARD_ROWS": "2000",
        "BATCHSCORE_DAG_JOBS_DIR": str(jobs),
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
    }
    checked(airflow(env, "db", "migrate"))
    checked(airflow(env, "pools", "set", "batchscore_scoring", "1", "batchscore scoring"))
    checked(airflow(env, "dags", "reserialize"))
    checked(airflow(env, "dags", "unpause", "score_after_daily"))

    runs = {
        "day1": airflow(env, "dags", "test", "score_daily", DAY1),
        "day2": airflow(
            env,
            "dags",
            "test",
            "score_daily",
            DAY2,
            "-c",
            json.dumps({"model_uri": "models:/churn/2", "batch_size": 256, "force": True}),
        ),
        "day1_again": airflow(env, "dags", "test", "score_daily", DAY1),
        "shadow": airflow(env, "dags", "test", "score_daily_challenger", DAY2),
        "broken": airflow(env, "dags", "test", "score_broken", DAY1, timeout=300),
    }
    return Scenario(home=home, store_url=store_url, jobs=jobs, env=env, runs=runs)


def daily_run_id(day: str) -> str:
    return f"score_daily__{day}T00_00_00_00_00"


def partition_keys(dataset: Path, day: str) -> set[int]:
    [part] = (dataset / f"dt={day}").glob("*.parquet")
    return set(pq.read_table(part, columns=[KEY]).column(KEY).to_pylist())


def test_each_logical_date_is_its_own_run_partition_and_version(
    scenario: Scenario, dataset: Path
) -> None:
    for name in ("day1", "day2"):
        assert scenario.runs[name].returncode == 0, scenario.output(name)[-6000:]
    state = open_store(scenario.store_url).state("daily")
    first, second = state.versions[1], state.versions[2]
    assert (first.run_id, second.run_id) == (daily_run_id(DAY1), daily_run_id(DAY2))
    assert state.live == 2 and state.history == [1, 2]
    for info, day in ((first, DAY1), (second, DAY2)):
        manifest = load_manifest(scenario.run_dir("daily", info.run_id))
        assert manifest.params.input_path == f"{dataset}/dt={day}"
        assert info.key_count == manifest.input.rows == 4_000  # type: ignore[union-attr]
        keys = {int(k) for p in info.parts for k in _keys(Path(p.path))}
        assert keys == partition_keys(dataset, day)


def _keys(part: Path) -> list[Any]:
    return list(pq.read_table(part, columns=[KEY]).column(KEY).to_pylist())


def test_the_form_values_override_the_job_config(scenario: Scenario) -> None:
    day1 = load_manifest(scenario.run_dir("daily", daily_run_id(DAY1)))
    day2 = load_manifest(scenario.run_dir("daily", daily_run_id(DAY2)))
    assert (day1.model.requested, day1.model.version) == ("models:/churn@champion", "1")
    assert (day2.model.requested, day2.model.version) == ("models:/churn/2", "2")
    assert (day1.params.batch_size, day2.params.batch_size) == (0, 256)  # 0: auto
    assert (day1.params.force, day2.params.force) == (False, True)
    assert day2.steps["score"]["batch_size"] == [256]


def test_running_a_date_again_publishes_nothing_twice(scenario: Scenario) -> None:
    assert scenario.runs["day1_again"].returncode == 0, scenario.output("day1_again")[-6000:]
    state = open_store(scenario.store_url).state("daily")
    assert state.live == 2 and state.history == [1, 2]
    assert sorted(state.runs) == sorted(
        [daily_run_id(DAY1), daily_run_id(DAY2), shadow_run_id(DAY2)]
    )
    manifest = load_manifest(scenario.run_dir("daily", daily_run_id(DAY1)))
    assert manifest.version == 1 and manifest.model.version == "1"  # the pin is kept
    assert manifest.steps["score"]["shards_scored"] == 0
    assert manifest.steps["export"]["reused"] is True
    assert manifest.steps["publish"]["note"] == "published earlier; not published again"
    assert "not published again" in scenario.output("day1_again")


def shadow_run_id(day: str) -> str:
    return f"score_daily_challenger__{day}T00_00_00_00_00__shadow_models_churn_challenger"


def test_a_shadow_run_writes_a_version_and_a_report_and_publishes_nothing(
    scenario: Scenario,
) -> None:
    output = scenario.output("shadow")
    assert scenario.runs["shadow"].returncode == 0, output[-6000:]
    state = open_store(scenario.store_url).state("daily")
    shadow = state.versions[state.runs[shadow_run_id(DAY2)]]
    assert state.live == 2 and shadow.version == 3
    assert shadow.state == "complete" and shadow.published_at is None
    assert (shadow.model_name, shadow.model_version) == ("churn", "1")  # @challenger

    run_dir = scenario.run_dir("daily", shadow_run_id(DAY2))
    manifest = load_manifest(run_dir)
    assert manifest.steps["publish"]["skipped"].startswith("shadow run: version 3 stays")
    assert "publish skipped: shadow run" in output
    report = json.loads((run_dir / "reports" / "shadow_comparison.json").read_text())
    assert report["candidate"] == {
        "requested": "models:/churn@challenger",
        "model": "churn",
        "version": "1",
        "store_version": 3,
    }
    assert report["live"]["version"] == 2 and report["live"]["model_version"] == "2"
    [compared] = report["outputs"]
    assert compared["output"] == "churn_probability" and compared["joined_keys"] == 4_000
    assert 0.5 < compared["changed_share"] <= 1.0  # two differently trained models
    assert 0.0 <= compared["ks"] <= 1.0 and compared["psi"] >= 0.0
    assert report["promote"] == "batchscore model promote churn 1 --alias champion"
    assert Path(report["plot"]).stat().st_size > 0


def test_publishing_records_one_asset_event_per_new_live_version(scenario: Scenario) -> None:
    code = """
import json
from sqlalchemy import select
from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
from airflow.utils.session import create_session
with create_session() as session:
    events = [
        {"uri": e.asset.uri, "dag": e.source_dag_id, "extra": e.extra}
        for e in session.scalars(select(AssetEvent).order_by(AssetEvent.id))
    ]
    queued = [
        {"dag": q.target_dag_id, "uri": session.get(AssetModel, q.asset_id).uri}
        for q in session.scalars(select(AssetDagRunQueue))
    ]
print(json.dumps({"events": events, "queued": queued}))
"""
    done = checked(
        subprocess.run(
            [str(BIN / "python"), "-c", code],
            env=scenario.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(e["uri"], e["dag"], e["extra"]["version"]) for e in found["events"]] == [
        ("batchscore://daily/", "score_daily", 1),
        ("batchscore://daily/", "score_daily", 2),
    ]  # none for the re-run of 2026-11-20, none for the shadow run
    assert found["events"][1]["extra"] == {
        "namespace": "daily",
        "version": 2,
        "run_id": daily_run_id(DAY2),
        "model": "churn/2",
    }
    # The asset-scheduled job is queued to run, as the scheduler would then do.
    assert found["queued"] == [{"dag": "score_after_daily", "uri": "batchscore://daily/"}]


def test_a_failed_step_is_named_with_its_error_and_not_retried_in_vain(
    scenario: Scenario,
) -> None:
    output = scenario.output("broken")
    assert scenario.runs["broken"].returncode != 0
    assert "batchscore: step 'resolve' of DAG score_broken" in output
    assert "failed on try 1: ModelNotFound: Registered model 'churn' has no alias" in output
    assert "'no_such_alias'" in output
    assert "Retry policy decision" in output and "action=fail" in output


def test_bad_configs_are_import_errors_beside_the_good_dags(scenario: Scenario) -> None:
    listing = airflow(scenario.env, "dags", "list-import-errors", "-o", "json")
    assert listing.returncode == 1  # the command's way of saying that there are errors
    [error] = json.loads(listing.stdout.strip().splitlines()[-1])
    assert error["filepath"] == "batchscore_job_configs.py"
    bad = scenario.jobs / "bad.yaml"
    assert f"{bad}: field 'model_uri': expected models:/<name>@<alias>" in error["error"]
    assert f"{bad}: field 'batch_size'" in error["error"] and "'lots'" in error["error"]
    assert f"{bad}: field 'input_path': expected a value; found none" in error["error"]
    dags = checked(airflow(scenario.env, "dags", "list", "-o", "json")).stdout
    listed = json.loads(dags.strip().splitlines()[-1])
    assert {d["dag_id"] for d in listed} >= {
        "batchscore",
        "score_daily",
        "score_daily_challenger",
        "score_after_daily",
        "score_broken",
    }
    assert "score_bad" not in {d["dag_id"] for d in listed}


def test_a_backfill_makes_one_run_per_logical_date(scenario: Scenario) -> None:
    """What ``airflow backfill create`` would run (the runs need a scheduler to execute)."""
    backfill = ["backfill", "create", "--dag-id", "score_daily", "--dry-run"]
    dates = ["--from-date", DAY1, "--to-date", "2026-11-22"]
    again = ["--reprocess-behavior", "completed"]
    missing = checked(airflow(scenario.env, *backfill, *dates)).stdout
    everything = checked(airflow(scenario.env, *backfill, *dates, *again)).stdout
    assert runs_listed(missing) == ["2026-11-22 00:00:00+00:00"]
    assert runs_listed(everything) == [f"2026-11-{d} 00:00:00+00:00" for d in (20, 21, 22)]


def runs_listed(output: str) -> list[str]:
    """The logical dates in the dry run's table of runs to be attempted."""
    table = output.split("Runs to be attempted:")[-1]
    return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| 20")]
