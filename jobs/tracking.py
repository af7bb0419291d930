"""Every scoring run is an MLflow run: what it scored, how, with what result.

One experiment per namespace (``batchscore/<namespace>``, or the ``mlflow_experiment``
setting), one MLflow run per scoring run, linked to the model it scored (tags, and the
logged model as the run's model input when there is one). The calls take the run folder,
not a live object, because each step may be a process of its own (an Airflow task):

- ``start`` (after resolve) creates the MLflow run, logs its parameters and records its
  id in the manifest (``Manifest.mlflow_run_id``); a retried resolve keeps that run;
- ``log_step`` (after resolve) logs that step's metrics to the run, by id;
- ``finish`` (at publish, or a publish that skips) logs every step's metrics from the
  manifest, the manifest and the reports as artifacts, and ends the run FINISHED,
  tagging the version it published;
- ``fail`` (when a step raises) logs the same and marks the run FAILED with the error
  (and the manifest, ``mlflow_failed_step``); ``resume``, called when a retried step
  then succeeds, sets it RUNNING again.

The steps between resolve and publish log nothing as they go: each DAG task is a process
of its own, and importing MLflow to log a few numbers cost each of them 1.5–3 s
(docs/benchmarks.md, the DAG's fixed costs), so their metrics wait in the manifest,
where ``batchscore status`` shows them meanwhile, for the run's end.
- ``fail_unresolved`` (when resolve raises: no folder, no manifest) creates the run
  FAILED with the error, so a model that is not found shows in MLflow too.

``jobs.flow`` makes these calls around each step, so ``batchscore run`` and the DAG's
tasks record alike. With ``mlflow_runs`` off, ``start`` records nothing and the others
find no run id and do nothing. Recording is best effort: an MLflow that fails a call
is logged as a warning, and the scoring run goes on; its outputs matter more than their
record.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscore.core import storage
from batchscore.core.errors import BatchscoreError
from batchscore.core.names import is_namespace
from batchscore.core.settings import RunSettings
from batchscore.core.urls import public_url
from jobs.context import load_run_settings
from jobs.manifest import (
    DOCS_LATER,
    DOCS_RECORD,
    DOCS_RUN_ENDED,
    MANIFEST,
    Manifest,
    RunParams,
    load_manifest,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("batchscore.jobs")

EXPERIMENT_PREFIX = "batchscore/"
ERROR_TAG_LIMIT = 5000  # MLflow keeps tag values up to 8,000 characters
TAG = "batchscore."  # the prefix of this project's tags


def experiment_name(settings: RunSettings, namespace: str) -> str:
    return settings.mlflow_experiment or f"{EXPERIMENT_PREFIX}{namespace}"


def start(run_dir: str | Path, settings: RunSettings | None = None) -> str | None:
    """The run's MLflow run, created once; its id, or None when runs are not recorded."""
    settings = settings or load_run_settings()
    manifest = load_manifest(run_dir)
    if manifest.mlflow_run_id or not settings.mlflow_runs:
        return manifest.mlflow_run_id
    try:
        client = _client(settings)
        experiment = _experiment(client, settings, experiment_name(settings, manifest.namespace))
        run = client.create_run(experiment, run_name=manifest.run_id, tags=start_tags(manifest))
        run_id = str(run.info.run_id)
        client.log_batch(run_id, params=_params(manifest))
        _link_model(client, run_id, manifest)
    except Exception as exc:  # noqa: BLE001 - best effort, see the module's docstring
        log.warning("could not record run %s in MLflow: %s", manifest.run_id, exc)
        return None
    manifest.mlflow_run_id = run_id
    manifest.save()
    log.info(
        "MLflow run %s in experiment %s", run_id, experiment_name(settings, manifest.namespace)
    )
    return run_id


def log_step(run_dir: str | Path, step: str, settings: RunSettings | None = None) -> None:
    """Log what ``step`` recorded in the manifest as metrics of the run's MLflow run."""
    manifest = load_manifest(run_dir)
    if manifest.mlflow_run_id is None:
        return
    metrics = step_metrics(manifest, step)
    with _recording(manifest, f"the {step} step"):
        client = _client(settings or load_run_settings())
        run_id = manifest.mlflow_run_id
        if client.get_run(run_id).info.status == "FAILED":  # a retry that succeeded
            client.update_run(run_id, status="RUNNING")
        _log_metrics(client, run_id, metrics)


def resume(run_dir: str | Path, settings: RunSettings | None = None) -> None:
    """A retried step succeeded after a failure marked the MLflow run FAILED: RUNNING again."""
    manifest = load_manifest(run_dir)
    if manifest.mlflow_run_id is None or manifest.mlflow_failed_step is None:
        return
    with _recording(manifest, "its retry"):
        client = _client(settings or load_run_settings())
        if client.get_run(manifest.mlflow_run_id).info.status == "FAILED":
            client.update_run(manifest.mlflow_run_id, status="RUNNING")
    manifest.mlflow_failed_step = None
    manifest.save()


# The steps jobs.flow records (its names), each with the manifest record that says it ran.
RECORDED_STEPS = {
    "plan": "plan",
    "score": "score",
    "validate_and_gate": "validate",
    "export_and_compare": "export",
    "publish": "publish",
}


def _steps_metrics(manifest: Manifest) -> dict[str, float]:
    found: dict[str, float] = {}
    for step, record in RECORDED_STEPS.items():
        if record in manifest.steps:
            found |= step_metrics(manifest, step)
    return found


def finish(run_dir: str | Path, settings: RunSettings | None = None) -> None:
    """End the MLflow run FINISHED: every step's metrics, the manifest and reports as
    artifacts, what it published."""
    manifest = load_manifest(run_dir)
    if manifest.mlflow_run_id is None:
        return
    with _recording(manifest, "the end of the run"):
        client = _client(settings or load_run_settings())
        run_id = manifest.mlflow_run_id
        tags = {f"{TAG}published": str(manifest.published).lower()}
        if manifest.published and manifest.version is not None:
            tags[f"{TAG}published_version"] = str(manifest.version)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        _log_metrics(client, run_id, _steps_metrics(manifest))
        _log_artifacts(client, run_id, manifest)
        client.set_terminated(run_id, status="FINISHED")


def fail(
    run_dir: str | Path, step: str, error: BaseException, settings: RunSettings | None = None
) -> None:
    """Mark the MLflow run FAILED with the step and the error; the artifacts so far too."""
    try:
        manifest = load_manifest(run_dir)
    except Exception:  # noqa: BLE001 - no manifest: resolve failed, no MLflow run exists
        return
    if manifest.mlflow_run_id is None:
        return
    with _recording(manifest, "its failure"):
        client = _client(settings or load_run_settings())
        run_id = manifest.mlflow_run_id
        client.set_tag(run_id, f"{TAG}failed_step", step)
        client.set_tag(run_id, f"{TAG}error", f"{type(error).__name__}: {error}"[:ERROR_TAG_LIMIT])
        _log_metrics(client, run_id, _steps_metrics(manifest) | step_metrics(manifest, step))
        _log_artifacts(client, run_id, manifest)
        client.set_terminated(run_id, status="FAILED")
    manifest.mlflow_failed_step = step
    manifest.save()


def fail_unresolved(
    settings: RunSettings, params: RunParams, run_id: str | None, error: BaseException
) -> str | None:
    """A run whose resolve failed has no folder: its MLflow run is created FAILED, with the
    error, beside the namespace's other runs; its id, or None when nothing was recorded.

    Recorded only for a failure batchscore named (no such model, a bad store URL, ...): an
    error of the registry's own connection would make the record wait on it again.
    """
    namespace = unresolved_namespace(params)
    if not settings.mlflow_runs or namespace is None or not isinstance(error, BatchscoreError):
        return None
    tags = {
        f"{TAG}namespace": namespace,
        f"{TAG}model_requested": params.model_uri,
        f"{TAG}store": public_url(params.store_url),
        f"{TAG}failed_step": "resolve",
        f"{TAG}error": f"{type(error).__name__}: {error}"[:ERROR_TAG_LIMIT],
        "mlflow.note.content": f"Scoring run of {params.model_uri} failed to resolve.",
    }
    if run_id:
        tags[f"{TAG}run_id"] = run_id
    try:
        client = _client(settings)
        experiment = _experiment(client, settings, experiment_name(settings, namespace))
        run = client.create_run(experiment, run_name=run_id, tags=tags)
        client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001 - best effort, see the module's docstring
        log.warning("could not record the failed resolve in MLflow: %s", exc)
        return None
    return str(run.info.run_id)


def unresolved_namespace(params: RunParams) -> str | None:
    """The namespace of a run that failed to resolve: the one given, else the name in the
    model URI (the default namespace); None when neither is a valid namespace."""
    from registry.uris import parse_model_uri

    if params.namespace:
        return params.namespace if is_namespace(params.namespace) else None
    try:
        name = parse_model_uri(params.model_uri).name
    except BatchscoreError:
        return None
    return name if name and is_namespace(name) else None


# ----------------------------------------------------------------------- what is logged


def start_tags(manifest: Manifest) -> dict[str, str]:
    """The link to the model and the store: enough to find the run from either side."""
    model = manifest.model
    tags = {
        f"{TAG}run_id": manifest.run_id,
        f"{TAG}namespace": manifest.namespace,
        f"{TAG}model_name": model.name,
        f"{TAG}model_version": model.version,
        f"{TAG}model_uri": model.uri,
        f"{TAG}model_requested": model.requested,
        f"{TAG}model_source": model.source,
        f"{TAG}store": manifest.store,  # without secrets
        f"{TAG}shadow": str("shadow" in manifest.steps).lower(),
        "mlflow.note.content": f"Scoring run {manifest.run_id} of {model.uri} "
        f"(requested {model.requested}) into {manifest.store}, namespace {manifest.namespace}.",
    }
    if model.source_run_id:
        tags[f"{TAG}model_run_id"] = model.source_run_id
    if model.model_id:
        tags[f"{TAG}model_id"] = model.model_id
    return tags


def run_params(manifest: Manifest) -> dict[str, str]:
    params = manifest.params
    values: dict[str, Any] = {
        "input": params.input_path,
        "key_column": params.key_column,
        "namespace": manifest.namespace,
        "model_uri": manifest.model.uri,
        "model_requested": manifest.model.requested,
        "store": manifest.store,  # RunParams refuses a URL with a password
        "batch_size": params.batch_size or "auto",
        "cluster": params.cluster,
        "workers": params.workers,
        "threads_per_worker": params.threads_per_worker,
        "shard_rows": params.shard_rows,
        "device": params.device,
        "precision": params.precision,
        "dry_run": params.dry_run,
        "force": params.force,
    }
    if params.features:
        values["features"] = ",".join(params.features)
    return {key: str(value)[:6000] for key, value in values.items()}


def step_metrics(manifest: Manifest, step: str) -> dict[str, float]:
    """``<step>.seconds`` and the step's other numbers; the validation verdict and the
    drift distances with the steps that decide them."""
    record = manifest.steps.get(step, {})
    found = {f"{step}.{key}": value for key, value in _numbers(record)}
    if step == "plan" and manifest.input is not None:
        found["rows"] = float(manifest.input.rows)
    if step == "score" and record.get("rows_per_second"):
        found["rows_per_second"] = float(record["rows_per_second"])
    if step in ("validate", "validate_and_gate"):
        found |= _validation_metrics(manifest)
    if step in ("drift", "validate_and_gate"):
        found |= drift_metrics(manifest)
    if step == "validate_and_gate":
        for inner in ("validate", "drift"):
            found |= {f"{inner}.{k}": v for k, v in _numbers(manifest.steps.get(inner, {}))}
    if step == "export_and_compare":
        found |= {f"export.{k}": v for k, v in _numbers(manifest.steps.get("export", {}))}
    return found


def drift_metrics(manifest: Manifest) -> dict[str, float]:
    drift = manifest.drift or {}
    found: dict[str, float] = {}
    for output in drift.get("outputs", []):
        name = _metric_key(str(output["output"]))
        found[f"drift.{name}.distance"] = float(output["distance"])
        found[f"drift.{name}.moved_share"] = float(output["moved_share"])
    if "passed" in drift:
        found["drift.passed"] = float(bool(drift["passed"]))
    return found


def _validation_metrics(manifest: Manifest) -> dict[str, float]:
    validation = manifest.validation or {}
    if "success" not in validation:
        return {}
    outcomes = validation.get("outcomes", [])
    return {
        "validation.success": float(bool(validation["success"])),
        "validation.expectations": float(len(outcomes)),
        "validation.failed": float(sum(1 for o in outcomes if not o.get("success"))),
    }


def _numbers(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, bool):
            yield _metric_key(key), float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            yield _metric_key(key), float(value)


def _metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``: anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


# ------------------------------------------------------------------------------ MLflow


def _client(settings: RunSettings) -> MlflowClient:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(
        tracking_uri=settings.tracking_uri,
        registry_uri=settings.mlflow_registry_uri or settings.tracking_uri,
    )


def _experiment(client: MlflowClient, settings: RunSettings, name: str) -> str:
    """The experiment's id, created when missing (its artifacts beside a SQLite database,
    as the registry's are; a server keeps its own)."""
    from registry.mlflow_registry import default_artifact_root

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    root = default_artifact_root(settings.tracking_uri)
    location = None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        location = root.absolute().as_uri()
    try:
        return str(client.create_experiment(name, location))
    except Exception:  # created meanwhile by another task of the same namespace
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _params(manifest: Manifest) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, value) for key, value in run_params(manifest).items()]


def _link_model(client: MlflowClient, run_id: str, manifest: Manifest) -> None:
    """The logged model the run scored, as the run's model input (MLflow 3's link)."""
    if not manifest.model.model_id:
        return
    from mlflow.entities import LoggedModelInput

    client.log_inputs(run_id, models=[LoggedModelInput(manifest.model.model_id)])


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for first in range(0, len(batch), 1000):  # MLflow takes at most 1,000 metrics a call
        client.log_batch(run_id, metrics=batch[first : first + 1000])


def log_left_reports(run_dir: str | Path, settings: RunSettings | None = None) -> None:
    """Log the run's Data Docs and drift plot to its MLflow run: the DAG's reports task,
    when the run ended before they were there (``jobs.data_docs.build_left``)."""
    manifest = load_manifest(run_dir)
    if manifest.mlflow_run_id is None:
        return
    with _recording(manifest, "its reports"):
        client = _client(settings or load_run_settings())
        others = set(manifest.reports) - {"data_docs", "distributions_png"}  # logged at the end
        _log_reports(client, manifest.mlflow_run_id, manifest, skip=others)


def _log_artifacts(client: MlflowClient, run_id: str, manifest: Manifest) -> None:
    """The manifest, and each report (Data Docs' folder, plots, the shadow comparison).
    The reports that the DAG's reports task is still making are its to log."""
    if storage.is_remote(manifest.run_dir):  # a run folder on an object store: a local copy
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / MANIFEST
            copy.write_bytes(storage.read_bytes(manifest.location))
            client.log_artifact(run_id, str(copy))
    else:
        client.log_artifact(run_id, str(manifest.path))
    # Asked first, whatever is there: it marks the run's end.
    if not _left_to_task(manifest.steps.get("validate")):
        _log_reports(client, run_id, manifest)
    else:  # the reports task logs what it makes; the others are logged here
        left = {"data_docs"} | ({"distributions_png"} if _plot_left(manifest) else set())
        _log_reports(client, run_id, manifest, skip=left)


def _log_reports(
    client: MlflowClient, run_id: str, manifest: Manifest, skip: set[str] | None = None
) -> None:
    """Each report that is there: Data Docs' folder, plots, the shadow comparison."""
    for name, path in manifest.reports.items():
        report = Path(path)
        if name in (skip or set()) or not report.is_file():
            continue
        if name == "data_docs":
            client.log_artifacts(run_id, str(report.parent), artifact_path="data_docs")
        else:
            client.log_artifact(run_id, str(report), artifact_path="reports")


def _plot_left(manifest: Manifest) -> bool:
    """Whether the drift step left its plot to the reports task (``plot_job``)."""
    return bool((manifest.steps.get("drift") or {}).get("plot_job"))


def _left_to_task(step: dict[str, Any] | None) -> bool:
    """Whether the run's reports are still the DAG's reports task's to make, which then
    logs them itself (``jobs.data_docs.build_left``). Marks the run's end first, then
    looks for the task's record: each of the two writes its file and then looks for the
    other's, so of two that pass each other one at least logs them. ``step`` is the
    validate step's record."""
    job = (step or {}).get("docs_job")
    if not job or not str((step or {}).get("docs_built_on", "")).startswith(DOCS_LATER):
        return False
    folder = Path(job).parent
    if not folder.is_dir():  # another host's folder: nothing to mark or to log here
        return False
    (folder / DOCS_RUN_ENDED).touch()
    return not (folder / DOCS_RECORD).exists()


class _recording:
    """Best effort: a failed MLflow call is a warning naming the run and what was recorded."""

    def __init__(self, manifest: Manifest, what: str) -> None:
        self.manifest, self.what = manifest, what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        log.warning(
            "could not record %s of run %s in MLflow run %s: %s",
            self.what,
            self.manifest.run_id,
            self.manifest.mlflow_run_id,
            error,
        )
        return True
