"""``batchscore demo``: the whole product on embedded defaults, no server to start.

A model is trained and registered in a local MLflow store, a dataset is
written, the DAG runs through Airflow itself (``airflow dags test`` against a
SQLite Airflow home), then the lookup API is started and queried over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pyarrow.parquet as pq
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from batchscore.core.errors import DemoFailed
from batchscore.core.settings import RunSettings
from batchscore.testing import ServiceExited, ServiceTimeout, free_port, wait_for_http

if TYPE_CHECKING:
    from jobs.manifest import Manifest

MODEL_NAME = "churn"
ALIAS = "champion"
N_FEATURES = 48
KEY_COLUMN = "customer_id"
DAG_ID = "batchscore"
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"
JOB_DAG_ID = "score_churn_daily"  # dags/jobs/churn_daily.yaml: one dt= partition a day
SCORING_POOL = "batchscore_scoring"  # the score task's pool (dags/batchscore_dags/pipeline.py)
API_START_SECONDS = 60.0


def run_demo(settings: RunSettings, *, rows: int, console: Console) -> int:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    console.rule(f"batchscore demo · home {home}")

    started = time.perf_counter()
    model = _ensure_model(settings, console)
    timings["model"] = time.perf_counter() - started

    started = time.perf_counter()
    data = _ensure_data(home / "demo-data", rows, console)
    timings["data"] = time.perf_counter() - started

    env = _environment(settings)
    started = time.perf_counter()
    _airflow_db(env, home, console)
    timings["airflow db"] = time.perf_counter() - started

    started = time.perf_counter()
    conf = {
        "input_path": str(data),
        "model_uri": f"models:/{MODEL_NAME}@{ALIAS}",
        "key_column": KEY_COLUMN,
    }
    _airflow_dags_test(env, conf, home, console)
    timings["airflow dags test"] = time.perf_counter() - started

    manifest = _live_manifest(settings)
    started = time.perf_counter()
    _query_api(env, settings, manifest, console)
    timings["lookup API"] = time.perf_counter() - started

    _print_summary(console, manifest, model, timings)
    _print_next_steps(console, settings, env)
    return 0


def _ensure_model(settings: RunSettings, console: Console) -> str:
    from registry.errors import ModelNotFound
    from registry.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry.from_settings(settings)
    try:
        pin = registry.resolve(f"models:/{MODEL_NAME}@{ALIAS}")
        console.print(f"[green]✓[/] model {MODEL_NAME}@{ALIAS} is version {pin.version} (reused)")
        return pin.version
    except ModelNotFound:
        pass
    from batchscore.samples import log_and_register, train_model

    with console.status(f"training an MLP over {N_FEATURES} features for a few seconds…"):
        trained = train_model(N_FEATURES, seconds=3.0)
        registered = log_and_register(
            trained,
            tracking_uri=settings.tracking_uri,
            registry_uri=settings.mlflow_registry_uri,
            artifact_root=settings.artifact_root,
            name=MODEL_NAME,
            n_features=N_FEATURES,
            serialization="pickle",
            alias=ALIAS,
        )
    console.print(
        f"[green]✓[/] trained and registered {registered.uri} with a column signature, "
        f"alias @{ALIAS} (MLflow store {settings.tracking_uri})"
    )
    return registered.version


def _ensure_data(folder: Path, rows: int, console: Console) -> Path:
    from batchscore.samples import make_dataset

    files = sorted(folder.rglob("*.parquet"))
    if files and sum(pq.ParquetFile(f).metadata.num_rows for f in files) == rows:
        console.print(f"[green]✓[/] dataset {folder}: {rows:,} rows in {len(files)} files (reused)")
        return folder
    for old in files:
        old.unlink()
    with console.status(f"writing {rows:,} rows of Parquet…"):
        written = make_dataset(folder, rows=rows, files=4, row_group_rows=max(rows // 20, 1000))
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in written)
    console.print(
        f"[green]✓[/] dataset {folder}: {rows:,} rows, {len(written)} files in partition "
        f"folders, {groups} row groups, key column '{KEY_COLUMN}'"
    )
    return folder


def _environment(settings: RunSettings) -> dict[str, str]:
    if not (DAGS_FOLDER / "batchscore_pipeline.py").exists():
        raise DemoFailed(
            f"The DAGs folder {DAGS_FOLDER} is missing",
            fix="Run the demo from a checkout installed with `pip install -e .` (make demo does)",
        )
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "BATCHSCORE_HOME": str(settings.home),
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            # The demo's model is pickled by this very demo: trust it explicitly.
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "GX_ANALYTICS_ENABLED": "false",
            "AIRFLOW_HOME": str(settings.home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
        }
    )
    return env


def _airflow_db(env: dict[str, str], home: Path, console: Console) -> None:
    log = home / "logs" / "airflow-db-migrate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    pool = ["airflow", "pools", "set", SCORING_POOL, "1", "Concurrent batchscore scoring runs"]
    with console.status("migrating the embedded Airflow database (SQLite)…"):
        with log.open("w") as handle:
            for command in (["airflow", "db", "migrate"], pool):
                done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    what = " ".join(command[:3])
                    found = f"exit {done.returncode}; see {log}"
                    raise DemoFailed(f"{what} failed", found=found)
    console.print(
        f"[green]✓[/] Airflow home {env['AIRFLOW_HOME']} (SQLite) is migrated; pool "
        f"{SCORING_POOL} has 1 slot (one scoring run at a time)"
    )


TASK_LINE = re.compile(r"running task <TaskInstance: \w+\.(\w+) ")
OUR_LINE = re.compile(r"\[info\s*\]\s+(.*?)\s+\[batchscore\.(?:jobs|dag)\]")
FAILED_LINE = re.compile(r"new_state=failed|Task failed|ERROR", re.IGNORECASE)


def _airflow_dags_test(
    env: dict[str, str], conf: dict[str, str], home: Path, console: Console
) -> None:
    log = home / "logs" / "airflow-dags-test.log"
    console.print(f"[bold]running the DAG '{DAG_ID}' with airflow dags test[/] (full log: {log})")
    command = ["airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)]
    with (
        log.open("w") as handle,
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            if match := TASK_LINE.search(line):
                console.print(f"  ▶ task [cyan]{match[1]}[/]")
            elif match := OUR_LINE.search(line):
                console.print(f"    {match[1]}")
            elif FAILED_LINE.search(line) and "batchscore" in line:
                console.print(f"    [red]{line.strip()[:300]}[/]")
    if process.returncode != 0 or "state=failed" in log.read_text().split("DagRun Finished")[-1]:
        raise DemoFailed(
            "The DAG run failed",
            found=f"airflow dags test exit {process.returncode}",
            fix=f"Read {log}",
        )
    console.print("[green]✓[/] DAG run succeeded")


def _live_manifest(settings: RunSettings) -> Manifest:
    """The manifest of the run whose version is live in the demo's store."""
    from jobs.manifest import load_manifest
    from kv_export.connect import open_from_settings

    store = open_from_settings(settings)
    live = store.state(MODEL_NAME).live_info()
    if live is None:
        raise DemoFailed(f"Namespace '{MODEL_NAME}' has no live version after the DAG run")
    return load_manifest(settings.runs_dir / MODEL_NAME / live.run_id)


def _query_api(
    env: dict[str, str], settings: RunSettings, manifest: Manifest, console: Console
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "batchscore.cli", "serve", "--port", str(port)]
    keys = _sample_keys(manifest)
    base = f"http://127.0.0.1:{port}"
    with subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as api:
        try:
            _wait_ready(base, api)
            console.print(f"[bold]lookup API on {base}[/] (OpenAPI: {base}/docs)")
            for key in keys[:3] + ["no-such-key"]:
                answer = httpx.get(f"{base}/v1/predictions/{MODEL_NAME}/{key}", timeout=5)
                console.print(f"  GET /v1/predictions/{MODEL_NAME}/{key} → {answer.status_code}")
                console.print_json(answer.text)
            batch = httpx.post(
                f"{base}/v1/predictions/{MODEL_NAME}/batch", json={"keys": keys[3:6]}, timeout=5
            )
            found = [r["status"] for r in batch.json()["results"]]
            console.print(f"  POST /v1/predictions/{MODEL_NAME}/batch {keys[3:6]} → {found}")
        finally:
            api.terminate()


def _sample_keys(manifest: Manifest) -> list[str]:
    part = manifest.shards[0].part
    column = manifest.params.key_column
    keys = pq.ParquetFile(part).read_row_group(0, columns=[column]).column(column).to_pylist()
    return [str(k) for k in keys[:: max(len(keys) // 6, 1)][:6]]


def _wait_ready(base: str, api: subprocess.Popen[bytes]) -> None:
    try:
        wait_for_http(f"{base}/healthz", seconds=API_START_SECONDS, process=api)
    except ServiceExited:
        error = api.stderr.read().decode()[-2000:] if api.stderr else ""
        raise DemoFailed("The lookup API exited at startup", found=error) from None
    except ServiceTimeout:
        raise DemoFailed(
            f"The lookup API did not answer /healthz within {API_START_SECONDS:.0f} s"
        ) from None


def _print_summary(
    console: Console, manifest: Manifest, model_version: str, timings: dict[str, float]
) -> None:
    table = Table(title="what the DAG run did")
    for column in ("step", "seconds", "rows", "detail"):
        table.add_column(column, justify="right" if column in ("seconds", "rows") else "left")
    for step, details in manifest.steps.items():
        detail = ""
        if step == "score":
            rate = details.get("rows_per_second") or 0
            detail = f"{rate:,.0f} rows/s, {details.get('shards_scored')} shards"
        elif step == "resolve":
            detail = f"{details.get('requested')} → {details.get('model')}"
        elif step in ("export", "publish"):
            detail = f"version {details.get('version')} {details.get('note', '')}"
        rows = details.get("rows")
        table.add_row(step, f"{details.get('seconds', 0):.2f}", f"{rows:,}" if rows else "", detail)
    console.print(table)
    console.print(
        Panel.fit(
            f"rows {manifest.input.rows if manifest.input else 0:,} · model "
            f"{manifest.model.name} v{manifest.model.version} · run {manifest.run_id} · "
            f"version {manifest.version} published\n"
            + " · ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()),
            title="summary",
        )
    )


def _print_next_steps(console: Console, settings: RunSettings, env: dict[str, str]) -> None:
    home = settings.home
    console.print(
        Panel.fit(
            "\n".join(
                [
                    "Serve the lookup API:  .venv/bin/batchscore serve --port 8000",
                    f"  then: curl localhost:8000/v1/predictions/{MODEL_NAME}/<key>",
                    f"Status and rollback:  batchscore status {MODEL_NAME} · "
                    f"batchscore rollback {MODEL_NAME}",
                    f"Airflow UI:  AIRFLOW_HOME={env['AIRFLOW_HOME']} "
                    f"AIRFLOW__CORE__DAGS_FOLDER={DAGS_FOLDER} "
                    f"BATCHSCORE_HOME={home} MLFLOW_TRACKING_URI={settings.tracking_uri} "
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true .venv/bin/airflow standalone",
                    f"  the job DAG {JOB_DAG_ID} scores one dt= partition per logical date: "
                    f"airflow backfill create --dag-id {JOB_DAG_ID} "
                    "--from-date 2026-11-20 --to-date 2026-11-22",
                    "Redis:  add --store redis://127.0.0.1:6379/0 to run, serve, status",
                    f"Models:  batchscore model list {MODEL_NAME}",
                ]
            ),
            title="try next",
        )
    )
