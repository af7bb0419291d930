"""Every scoring run is an MLflow run, read back through MlflowClient: on the SQLite
tracking store, and on `mlflow server` on PostgreSQL as docker-compose.yaml runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from batchscore.core.settings import RunSettings, load_settings
from jobs import flow, steps
from jobs.manifest import Manifest, load_manifest
from kv_export.store import open_store
from registry.mlflow_registry import MlflowRegistry
from scoring.errors import ValidationFailed
from tests.conftest import KEY, N_FEATURES, Registry, run_job
from tests.stack import Deployment, deploy, save_model_folder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def mlflow_run(tracking_uri: str, manifest: Manifest) -> Run:
    assert manifest.mlflow_run_id, "the run recorded no MLflow run"
    return MlflowClient(tracking_uri).get_run(manifest.mlflow_run_id)


def artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, path)}


def check_published_run(tracking_uri: str, manifest: Manifest, experiment: str) -> Run:
    """What a user reads of a published run in MLflow: status, link, params, metrics."""
    found = mlflow_run(tracking_uri, manifest)
    assert found.info.status == "FINISHED"
    assert MlflowClient(tracking_uri).get_experiment(found.info.experiment_id).name == experiment
    tags, params, metrics = found.data.tags, found.data.params, found.data.metrics
    assert tags["batchscore.run_id"] == manifest.run_id
    assert tags["batchscore.namespace"] == manifest.namespace
    assert tags["batchscore.model_name"] == manifest.model.name
    assert tags["batchscore.model_version"] == manifest.model.version
    assert tags["batchscore.store"] == manifest.store and "@" not in manifest.store
    assert tags["batchscore.published"] == "true"
    assert tags["batchscore.published_version"] == str(manifest.version)
    assert params["input"] == manifest.params.input_path and params["key_column"] == KEY
    assert params["store"] == manifest.store and params["cluster"] == manifest.params.cluster
    assert params["batch_size"] == str(manifest.params.batch_size or "auto")
    assert params["model_uri"] == manifest.model.uri
    assert manifest.input is not None and metrics["rows"] == manifest.input.rows
    assert metrics["rows_per_second"] > 0
    for step in ("resolve", "plan", "score", "validate", "drift", "export", "publish"):
        assert f"{step}.seconds" in metrics, f"no seconds for the {step} step"
    assert metrics["validation.success"] == 1.0 and metrics["drift.passed"] == 1.0
    assert metrics["export.rows"] == manifest.input.rows
    return found


def test_a_published_run_is_a_finished_mlflow_run(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    first = run_job(dataset, "models:/churn@champion", "tracked")
    found = check_published_run(registry.tracking_uri, first, "batchscore/tracked")
    run_id = found.info.run_id
    assert first.summary()["mlflow_run_id"] == run_id
    # The artifacts: the manifest, Data Docs, the distribution plot.
    assert {"manifest.json", "data_docs", "reports"} <= artifacts(registry.tracking_uri, run_id)
    assert "data_docs/index.html" in artifacts(registry.tracking_uri, run_id, "data_docs")
    assert "reports/distributions.png" in artifacts(registry.tracking_uri, run_id, "reports")
    recorded = MlflowClient(registry.tracking_uri).download_artifacts(run_id, "manifest.json")
    assert load_manifest(Path(recorded).parent).mlflow_run_id == run_id
    # The published version records the MLflow run (the lookup answer names it from there).
    live = open_store(first.params.store_url).state("tracked").live_info()
    assert live is not None and live.mlflow_run_id == run_id
    # The model version it scored: its logged model is the run's model input.
    assert found.inputs is not None and [m.model_id for m in found.inputs.model_inputs] == [
        first.model.model_id
    ]

    # Run again with churn v2 past the drift gate: the distances are metrics.
    second = run_job(dataset, "models:/churn/2", "tracked", force=True)
    again = mlflow_run(registry.tracking_uri, second)
    assert again.info.run_id != run_id and again.info.status == "FINISHED"
    assert second.drift is not None and second.drift["compared"]
    (row,) = second.drift["outputs"]
    assert again.data.metrics[f"drift.{row['output']}.distance"] == pytest.approx(row["distance"])
    assert again.data.metrics[f"drift.{row['output']}.moved_share"] == pytest.approx(
        row["moved_share"]
    )


def dag_like_run(dataset: Path, namespace: str) -> str:
    """resolve → plan → score → validate as the DAG's tasks call them: the validate task
    leaves the Data Docs and the drift plot to the reports task."""
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace=namespace,
    )
    run_dir = flow.start_run(settings, params)["run_dir"]
    flow.plan(run_dir)
    flow.score(run_dir)
    flow.validate_and_gate(run_dir, docs_later=True)
    flow.export_and_compare(run_dir)
    return run_dir


@pytest.mark.parametrize("docs_first", [True, False], ids=["docs-first", "run-ends-first"])
def test_the_data_docs_task_s_pages_reach_the_mlflow_run_whichever_ends_first(
    env: dict[str, str], registry: Registry, dataset: Path, docs_first: bool
) -> None:
    """The DAG's reports task runs beside export and publish: its pages and plot are
    logged by the publish task's end of the MLflow run when they are there, else by the
    reports task when it has made them."""
    from jobs import data_docs

    run_dir = dag_like_run(dataset, f"docs-{'first' if docs_first else 'last'}")
    if docs_first:
        assert data_docs.build_left(run_dir) is not None
    flow.publish_run(run_dir)
    manifest = load_manifest(run_dir)
    run_id = mlflow_run(registry.tracking_uri, manifest).info.run_id
    logged = artifacts(registry.tracking_uri, run_id)
    assert "manifest.json" in logged and ("data_docs" in logged) == docs_first
    assert ("reports" in logged) == docs_first  # the drift plot, the only report here
    if not docs_first:
        assert data_docs.build_left(run_dir) is not None
    found = mlflow_run(registry.tracking_uri, load_manifest(run_dir))
    assert found.info.status == "FINISHED"
    assert "data_docs/index.html" in artifacts(registry.tracking_uri, run_id, "data_docs")
    assert "reports/distributions.png" in artifacts(registry.tracking_uri, run_id, "reports")
    step = load_manifest(run_dir).steps["validate"]
    assert step["docs_built_on"].startswith("reports task, process ") and "docs_error" not in step


def test_a_failed_run_is_a_failed_mlflow_run_with_its_error(
    env: dict[str, str], registry: Registry, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHSCORE_MLFLOW_EXPERIMENT", "scoring-failures")
    with pytest.raises(ValidationFailed):
        run_job(dataset, "models:/broken@champion", "brokenrun")
    settings = load_settings(RunSettings)
    (folder,) = (settings.runs_dir / "brokenrun").iterdir()
    manifest = load_manifest(folder)
    found = mlflow_run(registry.tracking_uri, manifest)
    assert found.info.status == "FAILED"
    client = MlflowClient(registry.tracking_uri)
    assert client.get_experiment(found.info.experiment_id).name == "scoring-failures"
    assert found.data.tags["batchscore.failed_step"] == "validate_and_gate"
    assert found.data.tags["batchscore.error"].startswith("ValidationFailed: ")
    assert found.data.metrics["validation.success"] == 0.0
    assert "score.seconds" in found.data.metrics and "publish.seconds" not in found.data.metrics
    assert "manifest.json" in artifacts(registry.tracking_uri, found.info.run_id)


def test_no_mlflow_run_when_turned_off(
    env: dict[str, str], registry: Registry, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHSCORE_MLFLOW_RUNS", "false")
    manifest = run_job(dataset, "models:/churn/1", "untracked")
    assert manifest.published and manifest.mlflow_run_id is None
    assert (
        MlflowClient(registry.tracking_uri).get_experiment_by_name("batchscore/untracked") is None
    )


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Deployment]:
    """docker-compose.yaml's mlflow service on the machine's Postgres (see tests/stack.py)."""
    deployment = deploy(tmp_path / "stack", tmp_path / "data", services=("postgres", "mlflow"))
    yield deployment
    deployment.stop()


def test_a_run_is_recorded_by_a_tracking_server_on_postgres(
    env: dict[str, str],
    dataset: Path,
    tmp_path: Path,
    mlflow_server: Deployment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchscore.samples import feature_names, train_model

    with mlflow_server.stack.report_failure():
        server = mlflow_server.tracking_uri
        folder = save_model_folder(tmp_path / "model", train_model(N_FEATURES, 0.2), N_FEATURES)
        MlflowRegistry(server).register(str(folder), "served", alias="champion")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
        # A pt2 model's tensor signature names no columns: the features are given.
        features = feature_names(N_FEATURES)
        manifest = run_job(dataset, "models:/served@champion", "onserver", features=features)
        found = check_published_run(server, manifest, "batchscore/onserver")
        # The server keeps the artifacts in its own store (--artifacts-destination).
        assert "manifest.json" in artifacts(server, found.info.run_id)
        stored = list((tmp_path / "stack" / "mlartifacts").rglob("manifest.json"))
        assert stored, "the manifest is not in the server's artifact store"


def test_step_metrics_wait_for_the_end_and_a_retry_that_succeeds_resumes_the_run(
    env: dict[str, str], registry: Registry, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAG's tasks in order, the score task failing once as a lost worker would."""
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace="retried",
    )
    run_dir = flow.start_run(settings, params)["run_dir"]
    flow.plan(run_dir, settings)
    with monkeypatch.context() as patched:

        def lost_worker(*args: object, **kwargs: object) -> None:
            raise RuntimeError("worker tcp://127.0.0.1:1 lost")

        patched.setattr(steps, "score", lost_worker)
        with pytest.raises(RuntimeError, match="lost"):
            flow.score(run_dir, settings)
    failed = mlflow_run(registry.tracking_uri, load_manifest(run_dir))
    assert failed.info.status == "FAILED" and failed.data.tags["batchscore.failed_step"] == "score"
    assert load_manifest(run_dir).mlflow_failed_step == "score"

    flow.score(run_dir, settings)  # the retry
    manifest = load_manifest(run_dir)
    resumed = mlflow_run(registry.tracking_uri, manifest)
    assert resumed.info.status == "RUNNING" and manifest.mlflow_failed_step is None
    # The step's numbers are in the manifest; MLflow gets them at the run's end.
    assert manifest.steps["score"]["seconds"] > 0 and "score.seconds" not in resumed.data.metrics

    flow.validate_and_gate(run_dir, settings)
    flow.export_and_compare(run_dir, settings)
    flow.publish_run(run_dir, settings)
    check_published_run(registry.tracking_uri, load_manifest(run_dir), "batchscore/retried")
