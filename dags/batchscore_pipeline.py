"""Score a Parquet dataset with the registry's model and publish it to the lookup store.

resolve → plan → score → validate (GX suite, then the drift gate) → export → publish.
Each task calls into ``jobs.steps``; XCom carries only the run folder, ids and counts.
Heavy imports happen inside the tasks so that parsing this file stays cheap.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

log = logging.getLogger("batchscore.dag")

PARAMS = {
    "input_path": Param(
        "",
        type="string",
        minLength=1,
        title="Input path",
        description="A Parquet file or a folder of them (partition folders such as dt=... too).",
    ),
    "model_uri": Param(
        "models:/churn@champion",
        type="string",
        pattern=r"^models:/[^/@]+(/\d+|@[\w-]+)$",
        title="Model URI",
        description="models:/name@alias (resolved once, when the run starts) or models:/name/N.",
    ),
    "key_column": Param(
        "customer_id",
        type="string",
        minLength=1,
        title="Key column",
        description="The column whose value is each prediction's lookup key.",
    ),
    "namespace": Param(
        None,
        type=["null", "string"],
        title="Namespace",
        description="Keyspace in the store; empty means the registered model's name.",
    ),
    "store_url": Param(
        None,
        type=["null", "string"],
        title="Store URL",
        description="lmdb:///path or redis://host:port/db; empty means BATCHSCORE_STORE_URL.",
    ),
    "features": Param(
        None,
        type=["null", "string"],
        title="Feature columns",
        description="Comma-separated input columns, for models with a tensor signature.",
    ),
    "batch_size": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Batch size",
        description="Rows per forward pass; empty means BATCHSCORE_BATCH_SIZE (default: auto).",
    ),
    "dry_run": Param(
        False,
        type="boolean",
        title="Dry run",
        description="Score and validate, publish nothing.",
    ),
    "force": Param(
        False,
        type="boolean",
        title="Force",
        description="Re-score shards whose output parts already exist, and publish even if "
        "the drift gate fails (the override is recorded in the run's manifest).",
    ),
}


@dag(
    dag_id="batchscore",
    description=__doc__.splitlines()[0],
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["batchscore"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=20), "owner": "batchscore"},
)
def batchscore() -> None:
    @task
    def resolve(**context: Any) -> dict[str, Any]:
        from batchscore.settings import RunSettings, load_settings
        from jobs import steps

        params = context["params"]
        settings = load_settings(RunSettings)
        features = [f.strip() for f in (params.get("features") or "").split(",") if f.strip()]
        run_params = steps.make_params(
            settings,
            input_path=params["input_path"],
            model_uri=params["model_uri"],
            key_column=params["key_column"],
            namespace=params.get("namespace"),
            store_url=params.get("store_url"),
            batch_size=params.get("batch_size"),
            features=features or None,
            dry_run=params.get("dry_run", False),
            force=params.get("force", False),
        )
        dag_id, run_id = context["dag"].dag_id, context["dag_run"].run_id
        return steps.resolve(settings, run_params, run_id=f"{dag_id}__{run_id}")

    @task
    def plan(ref: dict[str, Any]) -> dict[str, Any]:
        from jobs import steps

        return steps.plan(ref["run_dir"])

    @task
    def score(planned: dict[str, Any]) -> dict[str, Any]:
        from jobs import steps

        def progress(done: int, total: int, rows: int) -> None:
            log.info("scored %d/%d shards, %d rows", done, total, rows)

        return steps.score(planned["run_dir"], on_progress=progress)

    @task
    def validate(scored: dict[str, Any]) -> dict[str, Any]:
        from jobs import steps

        # The drift gate runs inside this task so the task list stays the public one;
        # it is its own step (steps.check_drift) for the CLI and the tests.
        result = steps.validate(scored["run_dir"])
        gate = steps.check_drift(scored["run_dir"])
        reports = steps.run_reports(scored["run_dir"])
        for name, path in reports.items():
            log.info("report %s: file://%s", name, path)
        return result | {"drift_passed": gate["passed"], "drift_overridden": gate["overridden"]}

    @task
    def export(validated: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from jobs import steps

        result = steps.export(validated["run_dir"])
        if "skipped" in result:
            raise AirflowSkipException(f"export skipped: {result['skipped']}")
        return result

    @task
    def publish(exported: dict[str, Any]) -> dict[str, Any]:
        from jobs import steps

        return steps.publish(exported["run_dir"])

    publish(export(validate(score(plan(resolve())))))


batchscore()
