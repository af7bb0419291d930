"""The pipeline's one composition: the order of the steps and the rules between them.

``run_flow`` is ``batchscore run``; the DAG's tasks call ``start_run``, ``plan``,
``score``, ``validate_and_gate``, ``export_and_compare`` and ``publish_run`` one per
task, so a run from the command line and a run of the DAG take the same path:

    resolve (+ mark a shadow run) → plan → score → validate → drift gate → export
    (+ a shadow run's comparison with the live version) → publish (never a shadow run)

The rules that live here, and nowhere else:

- **published earlier**: a run that went live before is not validated or gated again
  (the live version may have moved on since; the run's verdict stands), its export is
  the version it published and its publish changes nothing;
- **shadow**: a shadow run scores the candidate, skips the drift gate, is compared
  with the live version after its export and is never published (``jobs.shadow``);
- **drift gate**: every other run is gated on drift after validation, before export.

- **MLflow run**: every run is recorded as an MLflow run (``jobs.tracking``): created
  when the run starts, each step's metrics logged when it ends, FAILED with its error
  when a step raises, FINISHED at publish (or a publish that skips); a run whose
  resolve fails is a FAILED MLflow run too, though it has no folder;
- **Prometheus**: the run's figures are pushed to the Pushgateway and written for
  node-exporter when the settings name them (``jobs.pipeline_metrics``), at the end of the
  run and when a step raises.

Each function is idempotent, as the steps are: a retried task or a re-run command
does no work twice and publishes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from batchscore.core.settings import RunSettings
from jobs import data_docs, pipeline_metrics, steps, tracking
from jobs.canary import CanaryRules
from jobs.context import is_shadow, load_run_settings
from jobs.drift_gate import check_drift, run_reports
from jobs.errors import RunError
from jobs.manifest import Manifest, RunParams, load_manifest
from jobs.publishing import export, publish
from jobs.results import (
    CanarySettled,
    ExportResult,
    GateResult,
    PlanResult,
    PublishResult,
    ScoreResult,
    Skipped,
    StartedRun,
)
from jobs.shadow import candidate_uri, compare, mark

log = logging.getLogger("batchscore.jobs")
T = TypeVar("T")


def _tracked(
    run_dir: str | Path, step: str, settings: RunSettings | None, call: Callable[[], T]
) -> T:
    """Run one composed step; its error goes to the run's MLflow run (its metrics wait in
    the manifest for the run's end: ``jobs.tracking``), and a retry that succeeds after a
    failure sets the MLflow run RUNNING again."""
    try:
        result = call()
    except BaseException as exc:
        tracking.fail(run_dir, step, exc, settings)
        _report(run_dir, settings, failed_step=step)
        raise
    if load_manifest(run_dir).mlflow_failed_step is not None:
        tracking.resume(run_dir, settings)
    return result


def _report(run_dir: str | Path, settings: RunSettings | None, failed_step: str | None) -> None:
    """The run's figures for Prometheus (``jobs.pipeline_metrics``), at its end or failure."""
    settings = settings or load_run_settings()
    if settings.pushgateway_url is None and settings.metrics_textfile_dir is None:
        return
    manifest = load_manifest(run_dir)
    pipeline_metrics.report(settings, manifest.namespace, manifest, failed_step=failed_step)


def start_run(
    settings: RunSettings,
    params: RunParams,
    *,
    run_id: str | None = None,
    shadow: str | None = None,
) -> StartedRun:
    """Resolve the run; with ``shadow`` (an alias of the model, e.g. ``challenger``,
    or a model URI), a shadow run that scores that candidate beside ``params.model_uri``.

    ``run_id`` None derives the run id from the inputs (``steps.resolve``); a shadow
    run's differs from the regular run's, so the two never share a folder.
    """
    candidate = candidate_uri(params.model_uri, shadow)
    try:
        if candidate is None:
            started: StartedRun = {**steps.resolve(settings, params, run_id), "shadow": None}
        else:
            started = _start_shadow(settings, params, candidate, run_id)
    except BaseException as exc:
        # No run folder to record in: the MLflow run and the metrics say what failed.
        tracking.fail_unresolved(settings, params, run_id, exc)
        namespace = tracking.unresolved_namespace(params)
        if namespace is not None:
            pipeline_metrics.report(settings, namespace, None, failed_step="resolve")
        raise
    run_dir = started["run_dir"]
    tracking.start(run_dir, settings)
    tracking.log_step(run_dir, "resolve", settings)
    return started


def _start_shadow(
    settings: RunSettings, params: RunParams, candidate: str, run_id: str | None
) -> StartedRun:
    if candidate == params.model_uri:
        raise RunError(
            f"The shadow candidate {candidate} is the live model itself",
            expected="a candidate other than the model, e.g. an alias such as challenger",
            fix="Give the candidate's alias or model URI (--shadow), or run without it",
        )
    scored = params.model_copy(update={"model_uri": candidate})
    ref = steps.resolve(settings, scored, run_id, shadow=True)
    mark(ref["run_dir"], candidate=candidate, live_model=params.model_uri)
    return {**ref, "shadow": candidate}


def plan(run_dir: str | Path, settings: RunSettings | None = None) -> PlanResult:
    """``steps.plan``, recorded in the run's MLflow run."""
    return _tracked(run_dir, "plan", settings, lambda: steps.plan(run_dir))


def score(
    run_dir: str | Path,
    settings: RunSettings | None = None,
    *,
    on_progress: steps.Progress | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> ScoreResult:
    """``steps.score``, recorded in the run's MLflow run."""
    return _tracked(
        run_dir,
        "score",
        settings,
        lambda: steps.score(run_dir, on_progress=on_progress, on_dashboard=on_dashboard),
    )


def validate_and_gate(
    run_dir: str | Path,
    settings: RunSettings | None = None,
    *,
    wait_for_docs: bool = True,
    docs_later: bool = False,
) -> GateResult:
    """The GX suite, then the drift gate; a shadow run is compared after its export instead.

    A run published earlier is not checked again: it passed both gates to go live. A
    passing run's Data Docs are built by a process of their own meanwhile
    (``jobs.data_docs``), waited for before this returns, or with ``wait_for_docs``
    off, by the caller's ``jobs.data_docs.finish`` (``run_flow``'s, after the export).
    With ``docs_later`` (the DAG's validate task), the DAG's reports task builds them
    (``jobs.data_docs.build_left``) beside the export, and draws the drift gate's plot;
    if the drift gate then blocks the run, no task follows, so they are built here
    before the error is raised (and the plot drawn, which the error names).
    """

    def validate_then_gate() -> GateResult:
        try:
            return _validate_and_gate(run_dir, settings, docs_later)
        except BaseException:
            if docs_later:  # no reports task follows to build them; finish waits below
                data_docs.build_later(run_dir, by="validate step")
            raise
        finally:
            if wait_for_docs or docs_later:
                data_docs.finish(run_dir)

    return _tracked(run_dir, "validate_and_gate", settings, validate_then_gate)


def _validate_and_gate(
    run_dir: str | Path, settings: RunSettings | None, docs_later: bool = False
) -> GateResult:
    manifest = load_manifest(run_dir)
    if manifest.published:
        log.info(
            "run %s was published as version %s after passing its gates; not run again",
            manifest.run_id,
            manifest.version,
        )
        return _gate(manifest.run_dir, None, published_earlier=True)
    validated = steps.validate(run_dir, docs_in_background=True, docs_later=docs_later)
    if is_shadow(manifest):
        log.info("shadow run: no drift gate; the export step compares it with the live version")
        return _gate(manifest.run_dir, validated["rows"])
    # The drift gate runs in the validate task so the DAG's task list stays the public
    # one; it is its own step (drift_gate.check_drift) with its own manifest record. Its
    # plot goes with the Data Docs where they were left to the reports task.
    left = load_manifest(run_dir).steps["validate"].get("docs_built_on") == data_docs.LATER
    gate = check_drift(run_dir, settings, plot_later=left)
    for name, path in run_reports(run_dir).items():
        log.info("report %s: file://%s", name, path)
    return _gate(manifest.run_dir, validated["rows"], gate["passed"], gate["overridden"])


def _gate(
    run_dir: str,
    rows: int | None,
    drift_passed: bool | None = None,
    drift_overridden: bool = False,
    *,
    published_earlier: bool = False,
) -> GateResult:
    return {
        "run_dir": run_dir,
        "success": True,  # a failed validation or drift gate raises
        "rows": rows,
        "published_earlier": published_earlier,
        "drift_passed": drift_passed,
        "drift_overridden": drift_overridden,
    }


def export_and_compare(
    run_dir: str | Path, settings: RunSettings | None = None
) -> ExportResult | Skipped:
    """Load the version (not live yet); for a shadow run, then write its comparison
    with the live version (also for a dry run, whose export is skipped)."""
    return _tracked(
        run_dir, "export_and_compare", settings, lambda: _export_and_compare(run_dir, settings)
    )


def _export_and_compare(
    run_dir: str | Path, settings: RunSettings | None
) -> ExportResult | Skipped:
    result = export(run_dir, settings)
    if not is_shadow(load_manifest(run_dir)):
        return result
    report = compare(run_dir, settings)
    log.info("shadow comparison: %s; report file://%s", report["note"], report["path"])
    if "skipped" in result:
        return result
    return {**result, "shadow_report": report["path"]}


def run_flow(
    settings: RunSettings,
    params: RunParams,
    *,
    run_id: str | None = None,
    shadow: str | None = None,
    on_progress: steps.Progress | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> Manifest:
    """The whole pipeline in this process (``batchscore run``), in the DAG's order.

    ``settings`` is passed to every step that opens the store: the caller's settings,
    not the environment's (a password given in ``--store``'s URL is only there).
    """
    if not data_docs.on_cluster(params.cluster, settings.runs_location):
        data_docs.prepare()  # a builder importing GX while the model is resolved
    run_dir = start_run(settings, params, run_id=run_id, shadow=shadow)["run_dir"]
    plan(run_dir, settings)
    score(run_dir, settings, on_progress=on_progress, on_dashboard=on_dashboard)
    try:  # the Data Docs are built while the drift gate and the export run
        validate_and_gate(run_dir, settings, wait_for_docs=False)
        export_and_compare(run_dir, settings)
    finally:
        data_docs.finish(run_dir)
    publish_run(run_dir, settings, canary=params.canary_percent)
    return load_manifest(run_dir)


def publish_run(
    run_dir: str | Path,
    settings: RunSettings | None = None,
    *,
    force: bool | None = None,
    canary: float | None = None,
) -> PublishResult | Skipped:
    """Flip the live pointer once (``publishing.publish``: a shadow run or a dry run skip),
    or with ``canary`` start the version as a canary at that share (a later publish
    without one promotes it); the run's MLflow run ends here, FINISHED, naming the
    version."""
    result = _tracked(
        run_dir, "publish", settings, lambda: publish(run_dir, settings, force=force, canary=canary)
    )
    tracking.finish(run_dir, settings)
    _report(run_dir, settings, failed_step=None)
    if "skipped" in result:
        return result
    return {**result, "mlflow_run_id": load_manifest(run_dir).mlflow_run_id}


def settle_canary(
    run_dir: str | Path, rules: CanaryRules, settings: RunSettings | None = None
) -> CanarySettled:
    """The end of a staged publish: check the run's canary against ``rules``
    (``jobs.canary.judge``), then promote it (through ``publish_run``: the run is
    published once, old versions are collected) or abort it. A canary changed by hand
    meanwhile raises ``CanaryRefused`` and nothing is done."""
    from jobs import canary

    settings = settings or load_run_settings()
    manifest = load_manifest(run_dir)
    if manifest.version is None:
        raise RunError(f"Run {manifest.run_id} has no exported version", fix="Run export first")
    verdict = canary.judge(
        settings, manifest.namespace, manifest.version, rules, manifest.params.store_url
    )
    manifest.record_step("canary_check", seconds=0.0, **verdict)
    manifest.save()
    if verdict["passed"]:
        published = publish_run(run_dir, settings)
        assert "skipped" not in published
        return {"verdict": verdict, "promoted": True, "published": published}
    canary.abort(settings, manifest.namespace, manifest.params.store_url)
    return {"verdict": verdict, "promoted": False, "published": None}
