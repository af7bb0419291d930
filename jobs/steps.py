"""The pipeline's steps: resolve → plan → score → validate → check_drift → export → publish.

Each step takes the run folder (and the settings), reads the manifest, does one thing,
records it, and returns a small document of pointers and counts (``jobs.results``),
which is what Airflow's XCom carries. Steps are idempotent: running one again after it
succeeded does no work twice and publishes nothing twice.

This module holds the steps up to validation; the drift gate is ``jobs.drift_gate``,
export and publish are ``jobs.publishing`` (their names are importable from here too).
``jobs.flow`` runs them in order, with the rules between them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batchscore.core import storage
from batchscore.core.names import check_namespace
from batchscore.core.settings import RunSettings
from jobs.context import (
    check_store,
    load_run_settings,
    local_folder,
    open_run_store,
    quality_rules,
    require_scored,
)
from jobs.data_docs import DocsInBackground, DocsOnCluster, on_cluster
from jobs.drift_gate import check_drift, run_reports
from jobs.errors import RunError
from jobs.manifest import (
    InputRecord,
    Manifest,
    ModelRecord,
    PieceRecord,
    RunParams,
    ShardRecord,
    load_manifest,
    safe_run_id,
)
from jobs.publishing import collect_garbage, collect_run_folders, export, publish
from jobs.results import PlanResult, RunRef, ScoreResult, ValidateResult

if TYPE_CHECKING:
    from registry.mlflow_registry import MlflowRegistry, ModelPin
    from scoring.engine import ScoreJob, ShardResult
    from scoring.shards import Shard
    from scoring.spec import ModelSpec
    from scoring.validation import PartChecks, PartReport, PartTarget

__all__ = [
    "Progress",
    "check_drift",
    "check_store",
    "collect_garbage",
    "collect_run_folders",
    "export",
    "load_run_settings",
    "make_params",
    "open_run_store",
    "plan",
    "publish",
    "quality_rules",
    "resolve",
    "run_reports",
    "score",
    "validate",
]

log = logging.getLogger("batchscore.jobs")
Progress = Callable[[int, int, int], None]  # (shards done, shards total, rows done)


def make_params(settings: RunSettings, **given: object) -> RunParams:
    """Run parameters: what the caller gave, settings for the rest."""
    defaults = {
        "store_url": settings.resolved_store_url,
        "batch_size": settings.batch_rows,
        "workers": settings.workers,
        "device": settings.device,
        "precision": settings.precision,
        "prefetch_row_groups": settings.prefetch_row_groups,
        "max_failed_shards": settings.max_failed_shards,
        "threads_per_worker": settings.threads_per_worker,
        "shard_rows": settings.shard_rows,
        "cluster": settings.cluster,
        "dashboard": settings.dashboard,
        "keep_versions": settings.keep_versions,
        "max_feature_null_rate": settings.max_feature_null_rate,
        "check_parts_in_score": settings.check_parts_in_score,
        "quality_config": str(settings.quality_config) if settings.quality_config else None,
        "drift": {
            "metric": settings.drift_metric,
            "max_distance": settings.drift_max_distance,
            "moved_delta": settings.drift_moved_delta,
            "max_moved_share": settings.drift_max_moved_share,
            "sample_rows": settings.drift_sample_rows,
        },
    }
    chosen = {k: v for k, v in given.items() if v is not None and v != ""}
    if chosen.get("batch_size") == "auto":
        chosen["batch_size"] = 0
    return RunParams.model_validate(defaults | chosen)


def resolve(
    settings: RunSettings, params: RunParams, run_id: str | None = None, *, shadow: bool = False
) -> RunRef:
    """Pin the model URI to one concrete model and create the run folder with its local copy.

    With a given ``run_id`` (an Airflow run) whose folder already exists, the
    pin recorded there is kept: a retried or cleared run never re-resolves.
    Without one (the CLI), the run id is derived from the namespace, the model
    pin and the input's fingerprint, so re-running the same command resumes; a
    ``shadow`` run's id differs from the regular run's of the same inputs.
    """
    from registry.mlflow_registry import MlflowRegistry

    started = time.perf_counter()
    # The namespace is a folder under runs/ and part of every store key: checked before
    # anything is opened or written (the model's name too, when it is the default).
    if params.namespace:
        check_namespace(params.namespace)
    check_store(settings, params.store_url)
    registry = MlflowRegistry.from_settings(settings)
    pin = registry.resolve(params.model_uri)
    namespace = params.namespace or check_namespace(
        pin.name,
        field="model name",
        fix=f"Give the run a namespace of its own (--namespace, the form's or the job "
        f"config's namespace field); the default namespace is the model's name, {pin.name!r}",
    )
    params = params.model_copy(update={"namespace": namespace})
    if run_id is None:
        run_id = _derived_run_id(params, pin.uri, shadow=shadow)
    run_id = safe_run_id(run_id)
    run_dir = storage.join(settings.runs_location, namespace, run_id)  # a path or a URL
    if storage.exists(storage.join(run_dir, "manifest.json")):
        return _resume(run_dir, params, settings)
    manifest = _new_run(registry, pin, run_dir, params, settings)
    manifest.record_step(
        "resolve", seconds=time.perf_counter() - started, model=pin.uri, requested=pin.requested
    )
    manifest.save()
    log.info("resolved %s to %s; run %s in %s", pin.requested, pin.uri, run_id, run_dir)
    return _ref(manifest)


def _derived_run_id(params: RunParams, model_uri: str, *, shadow: bool) -> str:
    """The CLI's run id: the same namespace, pin, key, features and input files (names,
    sizes, modification times) give the same run, so re-running a command resumes it."""
    from scoring.inputs import discover

    files = discover(params.input_path)
    digest = hashlib.sha256(
        "|".join(
            [str(params.namespace), model_uri, params.key_column, ",".join(params.features or [])]
            + [f.token for f in files]
        ).encode()
    ).hexdigest()[:16]
    return f"{'shadow' if shadow else 'run'}-{digest}"


def _resume(run_dir: str, params: RunParams, settings: RunSettings) -> RunRef:
    """A run folder that exists keeps its model pin; the parameters of now apply."""
    from scoring.spec import check_trusted

    manifest = load_manifest(run_dir)
    # A retry re-enters here: the trust setting of now decides, not that of the first try.
    check_trusted(manifest.model.serialization, manifest.model.uri, settings.allow_pickle)
    log.info("run %s exists; keeping its model pin %s", manifest.run_id, manifest.model.uri)
    manifest.params = params
    manifest.save()
    return _ref(manifest)


def _new_run(
    registry: MlflowRegistry, pin: ModelPin, run_dir: str, params: RunParams, settings: RunSettings
) -> Manifest:
    """The run folder with the pinned model's local copy; nothing is kept if the model
    cannot be scored here."""
    from scoring.errors import UnsupportedModel

    # The model's copy is local: in the run folder, or beside it for one on an object store.
    local = Path(run_dir) if not storage.is_remote(run_dir) else _run_cache(settings, run_dir)
    local.mkdir(parents=True, exist_ok=True)
    model_dir = registry.download(pin, local / "model")
    try:
        spec = _model_spec(model_dir, params, pin.uri, settings.allow_pickle)
    except UnsupportedModel:
        shutil.rmtree(local, ignore_errors=True)  # no manifest: nothing of the run is kept
        raise
    if storage.is_remote(run_dir):  # for workers on other hosts, before the manifest exists
        storage.put_tree(model_dir, storage.join(run_dir, "model"))
    assert params.namespace is not None
    return Manifest(
        run_id=storage.name_of(run_dir),
        namespace=params.namespace,
        run_dir=str(run_dir),
        params=params,
        model=ModelRecord(
            name=pin.name,
            version=pin.version,
            uri=pin.uri,
            requested=pin.requested,
            alias=pin.alias,
            source=pin.source,
            model_id=pin.model_id,
            source_run_id=pin.run_id,
            local_dir=str(model_dir),
            flavor=spec.flavor,
            serialization=spec.serialization,
            signature_kind=spec.signature_kind,
            features=list(spec.features),
            feature_types=dict(spec.feature_types),
            outputs=list(spec.outputs),
        ),
    )


def _run_cache(settings: RunSettings, run_dir: str) -> Path:
    """This machine's folder for a run folder on an object store (the model's copy), where
    ``jobs.context.local_folder`` puts its other local files."""
    namespace, run_id = run_dir.rstrip("/").rsplit("/", 2)[-2:]
    return settings.home / "run-cache" / namespace / run_id


def plan(run_dir: str | Path) -> PlanResult:
    """Check the input against the model and cut it into shards (footers only).

    Checks: key present and typed, feature columns present and numeric, null rate
    within ``max_feature_null_rate``, values castable without loss to the model's dtype.
    """
    from scoring.inputs import inspect_input
    from scoring.shards import plan_shards

    manifest = load_manifest(run_dir)
    started = time.perf_counter()
    params = manifest.params
    summary = inspect_input(
        params.input_path,
        manifest.model.features,
        params.key_column,
        feature_types=_feature_types(manifest),
        max_null_rate=params.max_feature_null_rate,
    )
    shards = plan_shards(summary.files, params.shard_rows)
    previous = {s.id: s for s in manifest.shards}
    manifest.input = InputRecord(
        root=summary.root,
        fingerprint=summary.fingerprint,
        rows=summary.rows,
        files=len(summary.files),
        key_type=summary.key_type,
    )
    manifest.shards = [_shard_record(s, manifest, previous.get(s.id)) for s in shards]
    manifest.record_step(
        "plan", seconds=time.perf_counter() - started, shards=len(shards), rows=summary.rows
    )
    manifest.save()
    log.info(
        "planned %d shards over %d files, %d rows", len(shards), len(summary.files), summary.rows
    )
    return {"run_dir": manifest.run_dir, "shards": len(shards), "rows": summary.rows}


@dataclass
class _ScoreTally:
    """What the score step learns from its shards' results, for the manifest."""

    results: dict[int, ShardResult]
    errors: dict[int, str] = field(default_factory=dict)
    loads: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    batch_sizes: set[int] = field(default_factory=set)
    dashboard: str | None = None  # the Dask dashboard of the cluster that scored

    def add(self, scored: list[ShardResult], errors: dict[int, str]) -> None:
        self.errors.update(errors)
        for result in scored:
            self.results[result.shard_id] = result
            worker = result.worker
            self.loads[worker] = max(self.loads.get(worker, 0), result.model_loads)
            self.peak_rss[worker] = max(self.peak_rss.get(worker, 0), result.peak_rss_bytes)
            self.paths.add(result.path)
            self.batch_sizes.add(result.batch_size)


def score(
    run_dir: str | Path,
    *,
    on_progress: Progress | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> ScoreResult:
    """Score every shard without a complete part on Dask; parts that exist are kept.

    ``on_dashboard`` is told the Dask dashboard's link once the cluster is up (when it
    has one), so a user can watch the run while it goes on; the step's record keeps it.

    Shards that fail are recorded as failed; more than ``max_failed_shards`` of them
    fail the step (``ShardFailed``) after the others' parts are recorded, so a rerun
    scores only what is missing.
    """
    from scoring.engine import existing_result
    from scoring.spec import read_model_spec

    manifest = load_manifest(run_dir)
    if manifest.input is None:
        raise RunError(f"Run {manifest.run_id} has no plan", fix="Run the plan step first")
    params = manifest.params
    started = time.perf_counter()
    spec = read_model_spec(Path(manifest.model.local_dir), tuple(manifest.model.features))
    job = _score_job(manifest, spec)
    shards = _shards(manifest)
    todo = [s for s in shards if params.force or not _keep_part(manifest.parts_dir, s)]
    todo_ids = {s.id for s in todo}
    tally = _ScoreTally(
        results={
            s.id: existing_result(s, storage.join(manifest.parts_dir, s.part_name), job)
            for s in shards
            if s.id not in todo_ids
        }
    )
    rows_done = sum(r.rows for r in tally.results.values())
    if on_progress:
        on_progress(len(tally.results), len(shards), rows_done)
    if todo:
        _score_on_dask(manifest, job, todo, tally, len(shards), on_progress, on_dashboard)
    seconds = time.perf_counter() - started
    _record_score(manifest, tally, todo, len(shards), seconds, spec.flavor)
    _enforce_failed_shards(manifest, tally.errors, len(shards))
    return {
        "run_dir": manifest.run_dir,
        "rows": manifest.steps["score"]["rows"],
        "shards_scored": len(todo),
        "seconds": round(seconds, 3),
    }


def _score_job(manifest: Manifest, spec: ModelSpec) -> ScoreJob:
    """What each Dask task needs to score a shard, from the run's pin and parameters."""
    from scoring.engine import ScoreJob

    params = manifest.params
    # Worker processes of a run folder on an object store fetch the run's copy of the model.
    remote = storage.is_remote(manifest.run_dir) and params.cluster != "local"
    return ScoreJob(
        run_id=manifest.run_id,
        model_dir=storage.join(manifest.run_dir, "model") if remote else manifest.model.local_dir,
        model_name=manifest.model.name,
        model_version=manifest.model.version,
        spec=spec,
        key_column=params.key_column,
        parts_dir=manifest.parts_dir,
        batch_size=params.batch_size,
        force=params.force,
        device=params.device,
        precision=params.precision,
        prefetch=params.prefetch_row_groups,
        checks=_part_checks(manifest) if params.check_parts_in_score else None,
    )


def _shards(manifest: Manifest) -> list[Shard]:
    from scoring.shards import Piece, Shard

    return [Shard(s.id, tuple(Piece(**p.model_dump()) for p in s.pieces)) for s in manifest.shards]


def _score_on_dask(
    manifest: Manifest,
    job: ScoreJob,
    todo: list[Shard],
    tally: _ScoreTally,
    total: int,
    on_progress: Progress | None,
    on_dashboard: Callable[[str], None] | None,
) -> None:
    """Score ``todo`` on the run's cluster: the results and the errors of failed shards,
    and the cluster's dashboard, go to ``tally``."""
    from scoring.engine import dashboard_link, dask_client, run_shards

    params = manifest.params
    kept = total - len(todo)
    rows_done = sum(r.rows for r in tally.results.values())

    def progress(result: ShardResult, done: int, _: int) -> None:
        nonlocal rows_done
        rows_done += result.rows
        if on_progress:
            on_progress(kept + done, total, rows_done)

    with dask_client(
        params.cluster, params.workers, params.threads_per_worker, dashboard=params.dashboard
    ) as client:
        tally.dashboard = dashboard_link(client, params.cluster, params.dashboard)
        log.info(
            "scoring %d of %d shards on %s (%d workers; dashboard: %s)",
            len(todo),
            total,
            client.scheduler.address,
            len(client.scheduler_info()["workers"]),
            tally.dashboard or "off",
        )
        if tally.dashboard and on_dashboard:
            on_dashboard(tally.dashboard)
        tally.add(
            *run_shards(
                client,
                todo,
                job,
                threads_per_worker=params.threads_per_worker,
                on_progress=progress,
            )
        )


def _record_score(
    manifest: Manifest,
    tally: _ScoreTally,
    todo: list[Shard],
    total: int,
    seconds: float,
    flavor: str,
) -> None:
    """Each shard's state, and the step's record: rows, rate, loads, memory, failures."""
    results, errors = tally.results, tally.errors
    for record in manifest.shards:
        outcome = results.get(record.id)
        if outcome is not None:
            record.state, record.error = "done", None
            record.seconds, record.worker = outcome.seconds, outcome.worker
            record.min_key, record.max_key = outcome.min_key, outcome.max_key
        elif record.id in errors:
            record.state, record.error = "failed", errors[record.id]
    outputs = {r.outputs for r in results.values()}
    if len(outputs) == 1:
        manifest.model.outputs = list(outputs.pop())
    scored_rows = sum(results[s.id].rows for s in todo if s.id in results)
    manifest.record_step(
        "score",
        seconds=seconds,
        rows=sum(r.rows for r in results.values()),
        rows_scored=scored_rows,
        rows_per_second=scored_rows / seconds if seconds else None,
        shards_scored=len(todo) - len(errors),
        shards_skipped=total - len(todo),
        shards_failed=len(errors),
        model_loads_per_worker=tally.loads,
        peak_rss_bytes_per_worker=tally.peak_rss,
        path=", ".join(sorted(tally.paths)) or flavor,
        batch_size=sorted(tally.batch_sizes),
        failed_shards={str(k): v for k, v in errors.items()},
        dashboard=tally.dashboard,
    )
    manifest.save()


def _enforce_failed_shards(manifest: Manifest, errors: dict[int, str], total: int) -> None:
    """The failure policy: up to ``max_failed_shards`` shards may fail (their rows are
    left out of the version); more fail the step."""
    from scoring.errors import ShardFailed

    for shard_id, error in errors.items():
        log.error("shard %d failed: %s", shard_id, error)
    limit = manifest.params.max_failed_shards
    if len(errors) > limit:
        first = next(iter(errors.items()))
        raise ShardFailed(
            f"{len(errors)} of {total} shards failed in run {manifest.run_id} "
            f"(at most {limit} may); shard {first[0]}: {first[1]}",
            fix="Fix the cause and run again: only the missing shards are scored",
        )


def _keep_part(parts_dir: str, shard: Shard) -> bool:
    """Whether the shard's part exists and can be kept: a part a power loss (or a full
    disk) damaged is set aside and its shard rescored, instead of failing every retry."""
    from scoring.engine import set_aside, usable_part

    part = storage.join(parts_dir, shard.part_name)
    if not storage.exists(part):
        return False
    damage = usable_part(part, shard.rows)
    if damage is None:
        return True
    aside = set_aside(part)
    log.warning(
        "part %s of shard %d is damaged (%s); moved to %s, rescoring", part, shard.id, damage, aside
    )
    return False


def validate(
    run_dir: str | Path, *, docs_in_background: bool = False, docs_later: bool = False
) -> ValidateResult:
    """Gate the run on its Great Expectations suite; a failure stops it before export.

    The per-part expectations ran on the workers as each part was written (results in
    ``<run>/validation/``); a part without a fresh result (a part scored earlier under
    another suite, or ``check_parts_in_score`` off) is checked now, on a cluster started
    with the run's settings. Row count and key uniqueness are checked here, across parts.
    The Data Docs are built where ``jobs.data_docs`` says; ``docs_in_background`` lets a
    passing run's be built by a process of their own while the caller goes on (it calls
    ``jobs.data_docs.finish`` before the run's reports are recorded); with ``docs_later``
    too, a later step starts that process (``jobs.data_docs.build_later``), where the run
    folder is one that every step's host shares (not an object store).
    """
    from scoring.errors import ValidationFailed
    from scoring.validation import PartTarget, validate_parts

    manifest = load_manifest(run_dir)
    require_scored(manifest)
    assert manifest.input is not None
    done = [s for s in manifest.shards if s.state == "done"]
    missing_rows = sum(s.rows for s in manifest.shards if s.state == "failed")
    checks = _part_checks(manifest)
    docs_builder: DocsOnCluster | DocsInBackground | None = None
    if on_cluster(manifest.params.cluster, manifest.run_dir):
        docs_builder = DocsOnCluster(manifest.params.cluster)
    elif docs_in_background:
        later = docs_later and not storage.is_remote(manifest.run_dir)
        docs_builder = DocsInBackground(manifest.run_dir, later=later)
    report = validate_parts(
        [PartTarget(s.id, s.part, s.rows) for s in done],
        checks,
        manifest.input.rows - missing_rows,
        recheck=lambda stale: _check_parts_on_cluster(manifest, stale, checks),
        docs_dir=local_folder(manifest, "data_docs"),
        run_name=manifest.run_id,
        build_docs=docs_builder,
    )
    manifest.validation = report.to_dict()
    if report.docs_index:
        manifest.reports["data_docs"] = report.docs_index
        log.info("validation report (GX Data Docs): file://%s", report.docs_index)
    manifest.record_step(
        "validate",
        seconds=report.seconds,
        rows=report.rows,
        success=report.success,
        failed=[o.describe() for o in report.failures],
        failed_parts=report.failed_parts,
        rows_of_failed_shards=missing_rows,
        parts_reused=report.parts_reused,
        parts_rechecked=report.parts_rechecked,
        part_check_seconds=round(report.part_check_seconds, 3),
        global_seconds=round(report.global_seconds, 3),
        docs_seconds=round(report.docs_seconds, 3),
        docs_built_on=docs_builder.built_on if docs_builder else "validate task",
        **_docs_job(docs_builder),
    )
    manifest.save()
    if not report.success:
        raise ValidationFailed(
            f"Output of run {manifest.run_id} failed validation: "
            + "; ".join(o.describe() for o in report.failures),
            failures=[o.__dict__ for o in report.failures],
            fix="Nothing was published; the live version is unchanged"
            + (f". Report: file://{report.docs_index}" if report.docs_index else ""),
        )
    return {"run_dir": manifest.run_dir, "success": True, "rows": report.rows}


def _docs_job(builder: DocsOnCluster | DocsInBackground | None) -> dict[str, str]:
    """The Data Docs job left for a later step to build (``docs_job``), if any."""
    if isinstance(builder, DocsInBackground) and builder.later and builder.job is not None:
        return {"docs_job": str(builder.job)}
    return {}


def _part_checks(manifest: Manifest) -> PartChecks:
    """The per-part suite of the run: its key, and per output the namespace's rules."""
    from scoring.validation import PartChecks

    return PartChecks(
        key_column=manifest.params.key_column,
        rules=quality_rules(manifest).outputs,
        # Beside the parts (on the object store too): the workers that check them and the
        # validate step may run on different hosts.
        results_dir=storage.join(manifest.run_dir, "validation"),
    )


def _check_parts_on_cluster(
    manifest: Manifest, targets: list[PartTarget], checks: PartChecks
) -> list[PartReport]:
    from scoring.engine import dask_client
    from scoring.validation import check_parts_on

    params = manifest.params
    workers = max(1, min(params.workers, len(targets)))
    log.info("checking %d parts without a fresh per-part result on Dask", len(targets))
    with dask_client(
        params.cluster, workers, params.threads_per_worker, dashboard=params.dashboard
    ) as client:
        return check_parts_on(client, targets, checks)


def _model_spec(
    model_dir: Path, params: RunParams, uri: str, allow_pickle: bool | None
) -> ModelSpec:
    from scoring.spec import check_loadable, read_model_spec

    spec = read_model_spec(model_dir, tuple(params.features) if params.features else None)
    check_loadable(spec, uri, allow_pickle)
    return spec


def _feature_types(manifest: Manifest) -> dict[str, str]:
    """The model's feature types, as the resolve step recorded them; a run resolved before
    they were recorded reads them from the model's MLmodel (which imports MLflow: seconds
    that a DAG's plan task otherwise does without)."""
    if manifest.model.feature_types is not None:
        return manifest.model.feature_types
    from scoring.spec import read_model_spec

    model = manifest.model
    return read_model_spec(Path(model.local_dir), tuple(model.features)).feature_types


def _shard_record(shard: Shard, manifest: Manifest, previous: ShardRecord | None) -> ShardRecord:
    record = ShardRecord(
        id=shard.id,
        pieces=[PieceRecord(**vars(p)) for p in shard.pieces],
        rows=shard.rows,
        part=storage.join(manifest.parts_dir, shard.part_name),
    )
    if previous is not None and previous.pieces == record.pieces:
        return previous
    return record


def _ref(manifest: Manifest) -> RunRef:
    return {
        "run_id": manifest.run_id,
        "run_dir": manifest.run_dir,
        "namespace": manifest.namespace,
        "model_name": manifest.model.name,
        "model_version": manifest.model.version,
    }
