"""The pipeline's steps: resolve → plan → score → validate → check_drift → export → publish.

Each step takes the run folder (and the settings), reads the manifest, does
one thing, records it, and returns a small dict of pointers and counts, which
is what Airflow's XCom carries. Steps are idempotent: running one again after
it succeeded does no work twice and publishes nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscore.core.names import check_namespace
from batchscore.core.settings import RunSettings, is_running_cluster
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
    utcnow,
)
from kv_export.connect import store_target

if TYPE_CHECKING:
    from kv_export.store import PredictionStore

log = logging.getLogger("batchscore.jobs")
DOCS_CLUSTER_TIMEOUT = 60  # seconds to connect to a running cluster, and for its Data Docs
Progress = Callable[[int, int, int], None]  # (shards done, shards total, rows done)


def make_params(settings: RunSettings, **given: Any) -> RunParams:
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
        "keep_versions": settings.keep_versions,
        "max_feature_null_rate": settings.max_feature_null_rate,
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


def resolve(settings: RunSettings, params: RunParams, run_id: str | None = None) -> dict[str, Any]:
    """Pin the model alias to one version and create the run folder with its local copy.

    With a given ``run_id`` (an Airflow run) whose folder already exists, the
    pin recorded there is kept: a retried or cleared run never re-resolves.
    Without one (the CLI), the run id is derived from the namespace, the model
    pin and the input's fingerprint, so re-running the same command resumes.
    """
    from registry.errors import UnsupportedModel
    from registry.mlflow_registry import MlflowRegistry
    from scoring.inputs import discover
    from scoring.model import check_trusted

    started = time.perf_counter()
    # The namespace is a folder under runs/ and part of every store key: checked before
    # anything is opened or written (the model's name too, when it is the default).
    if params.namespace:
        check_namespace(params.namespace)
    check_store(settings, params.store_url)
    registry = MlflowRegistry(settings.tracking_uri)
    pin = registry.resolve(params.model_uri)
    namespace = params.namespace or check_namespace(
        pin.name,
        field="model name",
        fix=f"Give the run a namespace of its own (--namespace, the form's or the job "
        f"config's namespace field); the default namespace is the model's name, {pin.name!r}",
    )
    if run_id is None:
        files = discover(params.input_path)
        digest = hashlib.sha256(
            "|".join(
                [namespace, pin.uri, params.key_column, ",".join(params.features or [])]
                + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
            ).encode()
        ).hexdigest()[:16]
        run_id = f"run-{digest}"
    run_id = safe_run_id(run_id)
    run_dir = settings.runs_dir / namespace / run_id
    existing = run_dir / "manifest.json"
    if existing.exists():
        manifest = load_manifest(run_dir)
        # A retry re-enters here: the trust setting of now decides, not that of the first try.
        check_trusted(manifest.model.serialization, manifest.model.uri, settings.allow_pickle)
        log.info("run %s exists; keeping its model pin %s", run_id, manifest.model.uri)
        manifest.params = params.model_copy(update={"namespace": namespace})
        manifest.save()
        return _ref(manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = registry.download(pin, run_dir / "model")
    try:
        spec = _model_spec(model_dir, params, pin.uri, settings.allow_pickle)
    except UnsupportedModel:
        shutil.rmtree(run_dir, ignore_errors=True)  # no manifest: nothing of the run is kept
        raise
    manifest = Manifest(
        run_id=run_id,
        namespace=namespace,
        run_dir=str(run_dir),
        params=params.model_copy(update={"namespace": namespace}),
        model=ModelRecord(
            name=pin.name,
            version=pin.version,
            uri=pin.uri,
            requested=pin.requested,
            alias=pin.alias,
            local_dir=str(model_dir),
            flavor=spec.flavor,
            serialization=spec.serialization,
            signature_kind=spec.signature_kind,
            features=list(spec.features),
            outputs=list(spec.outputs),
        ),
    )
    manifest.record_step(
        "resolve", seconds=time.perf_counter() - started, model=pin.uri, requested=pin.requested
    )
    manifest.save()
    log.info("resolved %s to %s; run %s in %s", pin.requested, pin.uri, run_id, run_dir)
    return _ref(manifest)


def plan(run_dir: str | Path) -> dict[str, Any]:
    """Check the input against the model and cut it into shards (footers only).

    Checks: key present and typed, feature columns present and numeric, null rate
    within ``max_feature_null_rate``, values castable without loss to the model's dtype.
    """
    from scoring.inputs import inspect_input
    from scoring.model import read_model_spec
    from scoring.shards import plan_shards

    manifest = load_manifest(run_dir)
    started = time.perf_counter()
    params = manifest.params
    spec = read_model_spec(Path(manifest.model.local_dir), tuple(manifest.model.features))
    summary = inspect_input(
        params.input_path,
        manifest.model.features,
        params.key_column,
        feature_types=spec.feature_types,
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


def score(run_dir: str | Path, *, on_progress: Progress | None = None) -> dict[str, Any]:
    """Score every shard without a complete part on Dask; parts that exist are kept."""
    from scoring.engine import ScoreJob, dask_client, existing_result, run_shards
    from scoring.errors import ShardFailed
    from scoring.model import read_model_spec
    from scoring.shards import Piece, Shard

    manifest = load_manifest(run_dir)
    if manifest.input is None:
        raise RunError(f"Run {manifest.run_id} has no plan", fix="Run the plan step first")
    params = manifest.params
    started = time.perf_counter()
    spec = read_model_spec(Path(manifest.model.local_dir), tuple(manifest.model.features))
    job = ScoreJob(
        run_id=manifest.run_id,
        model_dir=manifest.model.local_dir,
        model_name=manifest.model.name,
        model_version=manifest.model.version,
        spec=spec,
        key_column=params.key_column,
        parts_dir=str(manifest.parts_dir),
        batch_size=params.batch_size,
        force=params.force,
        device=params.device,
        precision=params.precision,
        prefetch=params.prefetch_row_groups,
        checks=_part_checks(manifest) if params.check_parts_in_score else None,
    )
    shards = [
        Shard(s.id, tuple(Piece(**p.model_dump()) for p in s.pieces)) for s in manifest.shards
    ]
    todo = [s for s in shards if params.force or not _keep_part(manifest.parts_dir, s)]
    todo_ids = {s.id for s in todo}
    results = {
        s.id: existing_result(s, manifest.parts_dir / s.part_name, job)
        for s in shards
        if s.id not in todo_ids
    }
    errors: dict[int, str] = {}
    loads: dict[str, int] = {}
    paths: set[str] = set()
    batch_sizes: set[int] = set()
    peak_rss: dict[str, int] = {}
    rows_done = sum(r.rows for r in results.values())
    if on_progress:
        on_progress(len(results), len(shards), rows_done)
    if todo:

        def progress(result: Any, done: int, total: int) -> None:
            nonlocal rows_done
            rows_done += result.rows
            if on_progress:
                on_progress(len(results) + done, len(shards), rows_done)

        with dask_client(params.cluster, params.workers, params.threads_per_worker) as client:
            log.info(
                "scoring %d of %d shards on %s (%d workers; dashboard: %s)",
                len(todo),
                len(shards),
                client.scheduler.address,
                len(client.scheduler_info()["workers"]),
                client.dashboard_link or "off",
            )
            scored, errors = run_shards(
                client,
                todo,
                job,
                threads_per_worker=params.threads_per_worker,
                on_progress=progress,
            )
        for result in scored:
            results[result.shard_id] = result
            loads[result.worker] = max(loads.get(result.worker, 0), result.model_loads)
            peak_rss[result.worker] = max(peak_rss.get(result.worker, 0), result.peak_rss_bytes)
            paths.add(result.path)
            batch_sizes.add(result.batch_size)
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
    seconds = time.perf_counter() - started
    scored_rows = sum(results[s.id].rows for s in todo if s.id in results)
    manifest.record_step(
        "score",
        seconds=seconds,
        rows=sum(r.rows for r in results.values()),
        rows_scored=scored_rows,
        rows_per_second=scored_rows / seconds if seconds else None,
        shards_scored=len(todo) - len(errors),
        shards_skipped=len(shards) - len(todo),
        shards_failed=len(errors),
        model_loads_per_worker=loads,
        peak_rss_bytes_per_worker=peak_rss,
        path=", ".join(sorted(paths)) or spec.flavor,
        batch_size=sorted(batch_sizes),
        failed_shards={str(k): v for k, v in errors.items()},
    )
    manifest.save()
    for shard_id, error in errors.items():
        log.error("shard %d failed: %s", shard_id, error)
    if len(errors) > params.max_failed_shards:
        first = next(iter(errors.items()))
        raise ShardFailed(
            f"{len(errors)} of {len(shards)} shards failed in run {manifest.run_id} "
            f"(at most {params.max_failed_shards} may); shard {first[0]}: {first[1]}",
            fix="Fix the cause and run again: only the missing shards are scored",
        )
    return {
        "run_dir": manifest.run_dir,
        "rows": manifest.steps["score"]["rows"],
        "shards_scored": len(todo),
        "seconds": round(seconds, 3),
    }


def _keep_part(parts_dir: Path, shard: Any) -> bool:
    """Whether the shard's part exists and can be kept: a part a power loss (or a full
    disk) damaged is set aside and its shard rescored, instead of failing every retry."""
    from scoring.engine import set_aside, usable_part

    part = parts_dir / shard.part_name
    if not part.exists():
        return False
    damage = usable_part(part, shard.rows)
    if damage is None:
        return True
    aside = set_aside(part)
    log.warning(
        "part %s of shard %d is damaged (%s); moved to %s, rescoring", part, shard.id, damage, aside
    )
    return False


def validate(run_dir: str | Path) -> dict[str, Any]:
    """Gate the run on Great Expectations; a failure stops it before export.

    The per-part expectations ran on the workers as each part was written (results in
    ``<run>/validation/``); a part without a fresh result (a part scored earlier under
    another suite, or ``check_parts_in_score`` off) is checked now, on a cluster started
    with the run's settings. Row count and key uniqueness are checked here, across parts.
    """
    from scoring.errors import ValidationFailed
    from scoring.validation import PartTarget, validate_parts

    manifest = load_manifest(run_dir)
    _require_scored(manifest)
    assert manifest.input is not None
    done = [s for s in manifest.shards if s.state == "done"]
    missing_rows = sum(s.rows for s in manifest.shards if s.state == "failed")
    checks = _part_checks(manifest)
    docs_builder = (
        _DocsOnCluster(manifest.params.cluster)
        if is_running_cluster(manifest.params.cluster)
        else None
    )
    report = validate_parts(
        [PartTarget(s.id, s.part, s.rows) for s in done],
        checks,
        manifest.input.rows - missing_rows,
        recheck=lambda stale: _check_parts_on_cluster(manifest, stale, checks),
        docs_dir=Path(manifest.run_dir) / "data_docs",
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


def _part_checks(manifest: Manifest) -> Any:
    """The per-part suite of the run: its key, and per output the namespace's rules."""
    from scoring.validation import PartChecks

    return PartChecks(
        key_column=manifest.params.key_column,
        rules=quality_rules(manifest).outputs,
        results_dir=str(Path(manifest.run_dir) / "validation"),
    )


def _check_parts_on_cluster(manifest: Manifest, targets: list[Any], checks: Any) -> list[Any]:
    from scoring.engine import dask_client
    from scoring.validation import check_parts_on

    params = manifest.params
    workers = max(1, min(params.workers, len(targets)))
    log.info("checking %d parts without a fresh per-part result on Dask", len(targets))
    with dask_client(params.cluster, workers, params.threads_per_worker) as client:
        return check_parts_on(client, targets, checks)


class _DocsOnCluster:
    """On a running cluster (``tcp://``/``tls://``), one of its workers builds the Data
    Docs: it has GX imported already (``scoring.preload``, or the per-part checks it ran),
    so the validate task's process never imports GX (~2 s, measured). The docs land in the
    run's folder, which the workers share (they wrote the parts there). If the cluster
    cannot take the job, they are built here. ``built_on`` says where they were."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.built_on = ""

    def __call__(self, *args: Any) -> Any:
        from distributed import Client

        from scoring.validation import build_data_docs

        try:
            with Client(self.address, timeout=DOCS_CLUSTER_TIMEOUT) as client:
                future = client.submit(build_data_docs, *args, pure=False)
                index = future.result(timeout=DOCS_CLUSTER_TIMEOUT)
            self.built_on = self.address
            return index
        except (OSError, TimeoutError) as exc:
            log.warning(
                "the cluster at %s could not build the Data Docs (%s: %s); building them here",
                self.address,
                type(exc).__name__,
                exc,
            )
        self.built_on = "validate task"
        return build_data_docs(*args)


def check_drift(run_dir: str | Path, settings: RunSettings | None = None) -> dict[str, Any]:
    """Gate the run on drift against the namespace's live version; ``force`` overrides.

    Reads the live version's output parts (``VersionInfo.parts``) and this run's,
    per output compares the distributions and the key-joined predictions, writes a
    PNG of both, and records everything in ``manifest.drift``. No live version, or
    this run already live: nothing to compare, the gate passes. A blocked run keeps
    its output on disk; the live version is untouched.
    """
    from scoring.drift import judge, read_samples
    from scoring.errors import DriftDetected
    from scoring.reports import plot_distributions

    manifest = load_manifest(run_dir)
    _require_scored(manifest)
    started = time.perf_counter()
    rules = quality_rules(manifest).drift
    store = open_run_store(manifest, settings)
    try:
        live = store.state(manifest.namespace).live_info()
    finally:
        store.close()
    done = [Path(s.part) for s in manifest.shards if s.state == "done"]
    live_parts = [Path(p.path) for p in live.parts] if live is not None else []
    compare = rules.enabled and live is not None and live.run_id != manifest.run_id
    samples = read_samples(
        live_parts if compare else [],
        done,
        manifest.params.key_column,
        live.key_column if live is not None else manifest.params.key_column,
        manifest.model.outputs,
        rules.sample_rows,
    )
    results = [
        judge(
            o, samples.live[o], samples.new[o], samples.live_joined[o], samples.new_joined[o], rules
        )
        for o in manifest.model.outputs
        if compare and o in samples.live
    ]
    plot = plot_distributions(
        samples.new,
        samples.live,
        Path(manifest.run_dir) / "reports" / "distributions.png",
        f"{manifest.namespace}: live v{live.version if live else '-'} vs run {manifest.run_id}",
    )
    manifest.reports["distributions_png"] = str(plot)
    drifted = [r for r in results if r.drifted]
    overridden = bool(drifted) and manifest.params.force
    manifest.drift = {
        "live_version": live.version if live is not None else None,
        "compared": compare,
        "rules": vars(rules),
        "outputs": [r.to_dict() for r in results],
        "passed": not drifted,
        "overridden": overridden,
    }
    manifest.record_step(
        "drift",
        seconds=time.perf_counter() - started,
        passed=not drifted,
        overridden=overridden,
        note=_drift_note(compare, results, overridden),
    )
    manifest.save()
    log.info("drift plot: file://%s", plot)
    if drifted and not overridden:
        raise DriftDetected(
            f"Output of run {manifest.run_id} drifted from live version "
            f"{live.version if live else None} of namespace '{manifest.namespace}': "
            + "; ".join(r.describe() for r in drifted),
            drift=[r.to_dict() for r in drifted],
            fix=f"Nothing was published; the output stays in {manifest.parts_dir}. "
            f"Plot: file://{plot}. Run again with --force (DAG param force) to publish anyway",
        )
    if overridden:
        log.warning("drift gate overridden by force: %s", "; ".join(r.describe() for r in drifted))
    return {"run_dir": manifest.run_dir, "passed": not drifted, "overridden": overridden}


def run_reports(run_dir: str | Path) -> dict[str, str]:
    """The run's report files (Data Docs index, plots), as recorded in the manifest."""
    return dict(load_manifest(run_dir).reports)


def _drift_note(compare: bool, results: list[Any], overridden: bool) -> str:
    if not compare:
        return "no live version to compare"
    worst = max(results, key=lambda r: r.distance / (r.max_distance or 1), default=None)
    if worst is None:
        return "not compared: the live output is gone from disk or shares no output"
    state = "OVERRIDDEN" if overridden else ("drifted" if worst.drifted else "ok")
    return f"{state}: {worst.metric} {worst.distance:.3f}, moved {worst.moved_share:.1%}"


def quality_rules(manifest: Manifest) -> Any:
    from scoring.quality import DriftRules, load_quality_config, namespace_quality

    return namespace_quality(
        manifest.namespace,
        manifest.model.outputs,
        DriftRules(**manifest.params.drift),
        load_quality_config(manifest.params.quality_config),
    )


def export(run_dir: str | Path, settings: RunSettings | None = None) -> dict[str, Any]:
    """Load the validated output into the store as a new, not yet visible version.

    ``BATCHSCORE_VERSION_TTL_SECONDS``, when set, becomes the namespace's TTL
    (0 removes it) before the version is loaded. With
    ``BATCHSCORE_EXPORT_ON_WORKERS=true`` and a scheduler address as the run's
    cluster, each Dask worker loads its own parts straight into the store.
    """
    from kv_export.encoding import bucket_count
    from kv_export.store import NewVersion, PartInfo

    manifest = load_manifest(run_dir)
    if manifest.params.dry_run:
        return _skipped(manifest, "export", "dry run")
    if manifest.published:  # in this store; another store gets its own version
        return _exported_earlier(manifest)
    if not (manifest.validation or {}).get("success"):
        raise RunError(
            f"Run {manifest.run_id} has not passed validation",
            fix="Run the validate step first; only validated output is exported",
        )
    drift = manifest.drift or {}
    if drift and not drift.get("passed") and not drift.get("overridden"):
        raise RunError(
            f"Run {manifest.run_id} failed the drift gate",
            fix="Inspect reports/distributions.png; run again with --force to publish anyway",
        )
    assert manifest.input is not None
    started = time.perf_counter()
    done = [s for s in manifest.shards if s.state == "done"]
    rows = sum(s.rows for s in done)
    new = NewVersion(
        run_id=manifest.run_id,
        expected_keys=rows,
        buckets=bucket_count(rows),
        outputs=manifest.model.outputs,
        model_name=manifest.model.name,
        model_version=manifest.model.version,
        scored_at=manifest.steps["score"]["finished_at"],
        key_column=manifest.params.key_column,
        key_type=manifest.input.key_type,
        output_dir=str(manifest.parts_dir),
        data_as_of=manifest.data_as_of,
        parts=[
            PartInfo(path=s.part, rows=s.rows, min_key=s.min_key, max_key=s.max_key) for s in done
        ],
    )
    result = _export_version(
        settings or load_run_settings(), manifest, new, [Path(s.part) for s in done]
    )
    seconds = time.perf_counter() - started
    record = manifest.store_record()
    record.version, record.keys, record.exported_at = result.info.version, result.keys, utcnow()
    manifest.record_step(
        "export",
        seconds=seconds,
        rows=result.keys,
        version=result.info.version,
        store=manifest.store,
        reused=result.reused,
        keys_per_second=result.keys / seconds if seconds and not result.reused else None,
    )
    manifest.save()
    log.info("exported version %s to %s", result.info.version, manifest.store)
    return {
        "run_dir": manifest.run_dir,
        "version": result.info.version,
        "keys": result.keys,
        "store": manifest.store,
    }


def _exported_earlier(manifest: Manifest) -> dict[str, Any]:
    """A published run is not loaded again: its version is live, kept or retired by retention.

    (Loading it again after retention dropped its version would make a new version.)
    """
    keys = manifest.store_record().keys
    manifest.record_step(
        "export",
        seconds=0.0,
        rows=keys,
        version=manifest.version,
        store=manifest.store,
        reused=True,
        note="published",
    )
    manifest.save()
    log.info(
        "run %s published version %s in %s; not exported again",
        manifest.run_id,
        manifest.version,
        manifest.store,
    )
    return {
        "run_dir": manifest.run_dir,
        "version": manifest.version,
        "keys": keys,
        "store": manifest.store,
    }


def load_run_settings() -> RunSettings:
    """The settings of a step run without a caller's (an Airflow task, ``batchscore step``)."""
    from batchscore.core.settings import load_settings

    return load_settings(RunSettings)


def open_run_store(manifest: Manifest, settings: RunSettings | None = None) -> PredictionStore:
    """The run's store, opened the one way (``kv_export.connect``): the URL of the run's
    parameters, the password and other store settings of ``settings``."""
    return store_target(settings or load_run_settings(), manifest.params.store_url).open()


def check_store(settings: RunSettings, url: str) -> None:
    """Fail before any scoring when the run's store cannot be reached or refuses the
    credentials; the error names the store without its secret and the setting to use."""
    store = store_target(settings, url).open()
    try:
        store.ping()
    finally:
        store.close()


def _export_version(settings: RunSettings, manifest: Manifest, new: Any, parts: list[Path]) -> Any:
    """Export from this process, or from the Dask workers when asked and a scheduler is named."""
    from kv_export.export import export_parts, export_parts_on_dask

    store = open_run_store(manifest, settings)
    try:
        if settings.version_ttl_seconds is not None:
            store.set_ttl(manifest.namespace, settings.version_ttl_seconds)
        cluster = manifest.params.cluster
        if not (settings.export_on_workers and is_running_cluster(cluster)):
            return export_parts(store, manifest.namespace, new, parts)
    finally:
        store.close()
    from distributed import Client

    with Client(cluster) as client:
        target = store_target(settings, manifest.params.store_url)
        return export_parts_on_dask(client, target, manifest.namespace, new, parts)


def publish(
    run_dir: str | Path, settings: RunSettings | None = None, *, force: bool | None = None
) -> dict[str, Any]:
    """Flip the namespace's live pointer to this run's version, once; then collect garbage.

    Refuses (``VersionNotFound`` / ``VersionIncomplete`` / ``VersionExpired``) a version
    the store does not have, that is still loading or whose TTL passed, and
    (``VersionOutOfOrder``) one whose data is older than the newest published, unless
    ``force`` (default: the run's ``force`` parameter); the live version is then
    unchanged. A run publishes at most once: run again after its publish, it leaves the
    live pointer where it is. A shadow run (``jobs.shadow``) is never published.
    """
    from jobs import shadow
    from kv_export.errors import AlreadyPublished, VersionOutOfOrder

    manifest = load_manifest(run_dir)
    if manifest.params.dry_run:
        return _skipped(manifest, "publish", "dry run")
    if shadow.is_shadow(manifest):
        report = manifest.reports.get("shadow_comparison", "not written")
        why = f"shadow run: version {manifest.version} stays unpublished; comparison: {report}"
        return _skipped(manifest, "publish", why)
    if manifest.version is None:
        raise RunError(f"Run {manifest.run_id} has no exported version", fix="Run export first")
    started = time.perf_counter()
    was_published = manifest.published
    settings = settings or load_run_settings()
    force = manifest.params.force if force is None else force
    store = open_run_store(manifest, settings)
    try:
        before = store.state(manifest.namespace).live
        info, note = None, "published earlier; not published again"
        if was_published and before != manifest.version:  # a run publishes once
            log.warning("run %s published v%s before; not again", manifest.run_id, manifest.version)
        else:
            try:
                info = store.publish(
                    manifest.namespace, manifest.version, manifest.params.keep_versions, force=force
                )
                note = "already live" if before == manifest.version else "published"
            except AlreadyPublished as exc:
                log.warning("%s", exc)
            except VersionOutOfOrder as exc:
                fix = (exc.fix or "").replace("RUN_FOLDER", manifest.run_dir)
                raise VersionOutOfOrder(exc.what, expected=exc.expected, fix=fix) from None
        collected = collect_garbage(store, manifest, settings)
    finally:
        store.close()
    record = manifest.store_record()
    record.published = True
    record.published_at = record.published_at or (info.published_at if info else None)
    manifest.record_step(
        "publish",
        seconds=time.perf_counter() - started,
        version=manifest.version,
        previous=before,
        store=manifest.store,
        note=note,
        forced=force,
        **collected,
    )
    manifest.save()
    where = f"namespace {manifest.namespace} in {manifest.store}"
    log.info("%s: version %s %s", where, manifest.version, note)
    return {
        "run_dir": manifest.run_dir,
        "run_id": manifest.run_id,
        "namespace": manifest.namespace,
        "store": manifest.store,
        "model": f"{manifest.model.name}/{manifest.model.version}",
        "version": manifest.version,
        "previous": before,
        "note": note,
        # Live now, and not through an earlier, completed publish of this run.
        "newly_published": note != "published earlier; not published again" and not was_published,
    }


def collect_garbage(
    store: PredictionStore, manifest: Manifest, settings: RunSettings
) -> dict[str, Any]:
    """After a publish: the store's collection (bounded by ``gc_seconds``), then old run
    folders. A failure to collect is logged, never a failed publish; the next one retries.
    """
    from kv_export.errors import StoreError

    try:
        deleted = store.gc(
            manifest.namespace,
            manifest.params.keep_versions,
            loading_grace_seconds=settings.loading_grace_seconds,
            spare_run=manifest.run_id,
            budget_seconds=settings.gc_seconds,
        )
        folders = collect_run_folders(
            Path(manifest.run_dir),
            store.state(manifest.namespace),
            manifest.store,
            settings.keep_run_days,
        )
    except (StoreError, OSError) as exc:
        log.warning("collection after the publish failed (the next publish retries): %s", exc)
        return {"collected_versions": [], "collected_run_folders": []}
    if deleted or folders:
        log.info("collected versions %s and run folders %s", [i.version for i in deleted], folders)
    return {
        "collected_versions": [info.version for info in deleted],
        "collected_run_folders": [str(f) for f in folders],
    }


def collect_run_folders(
    run_dir: Path, state: Any, store_label: str, keep_days: float, now: float | None = None
) -> list[Path]:
    """Delete the namespace's run folders that nothing needs; return them.

    A folder goes when all hold: unchanged for ``keep_days`` days; no version record
    of this store (live, kept, in flight or being deleted) names its run or lies in
    it (the lookup API's batch fallback reads the parts of the live and kept
    versions); and its manifest records no version in another store (whose retention
    this store cannot see: such folders are left alone). The current run's never goes.
    """
    import shutil

    from jobs.manifest import MANIFEST

    infos = [*state.versions.values(), *state.deleting.values()]
    runs = {info.run_id for info in infos}
    paths = [
        Path(p) for info in infos for p in (info.output_dir, *(x.path for x in info.parts)) if p
    ]
    cutoff = (now or time.time()) - keep_days * 86400
    gone: list[Path] = []
    for folder in sorted(run_dir.parent.iterdir()):
        if folder == run_dir or not folder.is_dir() or folder.name.startswith("."):
            continue
        changed = max(p.stat().st_mtime for p in (folder, folder / MANIFEST) if p.exists())
        if changed > cutoff or folder.name in runs or any(p.is_relative_to(folder) for p in paths):
            continue
        if _in_another_store(folder / MANIFEST, store_label):
            continue
        trash = folder.with_name(f".deleting-{folder.name}")
        folder.rename(trash)  # one step out of sight; a crash leaves only the trash
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(folder)
    for trash in run_dir.parent.glob(".deleting-*"):
        shutil.rmtree(trash, ignore_errors=True)
    return gone


def _in_another_store(path: Path, store_label: str) -> bool:
    if not path.exists():
        return False
    try:
        manifest = load_manifest(path.parent)
    except (RunError, ValueError, OSError):
        return True  # unreadable: keep it, someone should look at it
    return any(
        r.version is not None for label, r in manifest.stores.items() if label != store_label
    )


def _model_spec(model_dir: Path, params: RunParams, uri: str, allow_pickle: bool | None) -> Any:
    from scoring.model import check_loadable, read_model_spec

    spec = read_model_spec(model_dir, tuple(params.features) if params.features else None)
    check_loadable(spec, uri, allow_pickle)
    return spec


def _shard_record(shard: Any, manifest: Manifest, previous: ShardRecord | None) -> ShardRecord:
    record = ShardRecord(
        id=shard.id,
        pieces=[PieceRecord(**vars(p)) for p in shard.pieces],
        rows=shard.rows,
        part=str(manifest.parts_dir / shard.part_name),
    )
    if previous is not None and previous.pieces == record.pieces:
        return previous
    return record


def _require_scored(manifest: Manifest) -> None:
    missing = [
        s.id
        for s in manifest.shards
        if s.state == "pending" or (s.state == "done" and not Path(s.part).exists())
    ]
    if not manifest.shards or missing:
        raise RunError(
            f"Run {manifest.run_id} is not completely scored",
            expected="a complete part for every shard",
            found=f"shards without a part: {missing[:10]}" if missing else "no shards",
            fix="Run the score step",
        )


def _skipped(manifest: Manifest, step: str, why: str) -> dict[str, Any]:
    manifest.record_step(step, seconds=0.0, skipped=why)
    manifest.save()
    return {"run_dir": manifest.run_dir, "skipped": why}


def _ref(manifest: Manifest) -> dict[str, Any]:
    return {
        "run_id": manifest.run_id,
        "run_dir": manifest.run_dir,
        "namespace": manifest.namespace,
        "model_name": manifest.model.name,
        "model_version": manifest.model.version,
    }
