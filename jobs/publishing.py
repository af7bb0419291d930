"""Export and publish: a validated run's output becomes a version in the store, then live.

``export`` loads a new version nobody reads yet; ``publish`` flips the namespace's live
pointer to it, once, and collects what the namespace no longer needs (old versions,
old run folders). Both are idempotent: a retried export reuses the run's version, a
retried publish leaves the live pointer where it is.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from batchscore.core import storage
from batchscore.core.settings import RunSettings, is_running_cluster
from jobs.context import is_shadow, load_run_settings, open_run_store, skip_step
from jobs.errors import RunError
from jobs.manifest import MANIFEST, Manifest, load_manifest, utcnow
from jobs.results import ExportResult, PublishResult, Skipped
from kv_export.connect import store_target

if TYPE_CHECKING:
    from kv_export.export import ExportResult as StoreExport
    from kv_export.store import NamespaceState, NewVersion, PredictionStore, VersionInfo

log = logging.getLogger("batchscore.jobs")
PUBLISHED_EARLIER = "published earlier; not published again"


class Collected(TypedDict):
    collected_versions: list[int]
    collected_run_folders: list[str]


def export(run_dir: str | Path, settings: RunSettings | None = None) -> ExportResult | Skipped:
    """Load the validated output into the store as a new, not yet visible version.

    ``BATCHSCORE_VERSION_TTL_SECONDS``, when set, becomes the namespace's TTL
    (0 removes it) before the version is loaded. With
    ``BATCHSCORE_EXPORT_ON_WORKERS=true`` and a scheduler address as the run's
    cluster, each Dask worker loads its own parts straight into the store.
    """
    manifest = load_manifest(run_dir)
    if manifest.params.dry_run:
        return skip_step(manifest, "export", "dry run")
    if manifest.published:  # in this store; another store gets its own version
        return _exported_earlier(manifest)
    _require_gates_passed(manifest)
    started = time.perf_counter()
    done = [s for s in manifest.shards if s.state == "done"]
    result = _export_version(
        settings or load_run_settings(),
        manifest,
        _new_version(manifest),
        [s.part for s in done],  # paths or object URLs
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
        loaded_on=list(result.loaded_on) or "this process",  # or the Dask workers' names
    )
    manifest.save()
    log.info("exported version %s to %s", result.info.version, manifest.store)
    return {
        "run_dir": manifest.run_dir,
        "version": result.info.version,
        "keys": result.keys,
        "store": manifest.store,
    }


def _require_gates_passed(manifest: Manifest) -> None:
    """Only output that passed validation, and the drift gate where it ran, is exported."""
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


def _new_version(manifest: Manifest) -> NewVersion:
    from kv_export.encoding import bucket_count
    from kv_export.store import NewVersion, PartInfo

    assert manifest.input is not None
    done = [s for s in manifest.shards if s.state == "done"]
    rows = sum(s.rows for s in done)
    return NewVersion(
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
        mlflow_run_id=manifest.mlflow_run_id,
        parts=[
            PartInfo(path=s.part, rows=s.rows, min_key=s.min_key, max_key=s.max_key) for s in done
        ],
    )


def _exported_earlier(manifest: Manifest) -> ExportResult:
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


def _export_version(
    settings: RunSettings, manifest: Manifest, new: NewVersion, parts: list[str]
) -> StoreExport:
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
    run_dir: str | Path,
    settings: RunSettings | None = None,
    *,
    force: bool | None = None,
    canary: float | None = None,
) -> PublishResult | Skipped:
    """Flip the namespace's live pointer to this run's version, once; then collect garbage.

    Refuses (``VersionNotFound`` / ``VersionIncomplete`` / ``VersionExpired``) a version
    the store does not have, that is still loading or whose TTL passed, and
    (``VersionOutOfOrder``) one whose data is older than the newest published, unless
    ``force`` (default: the run's ``force`` parameter); the live version is then
    unchanged. A run publishes at most once: run again after its publish, it leaves the
    live pointer where it is. A shadow run (``jobs.shadow``) is never published.

    With ``canary`` the version is not made live but a canary beside the live version,
    answering that share of the keys (``NamespaceState.start_canary``); ``batchscore
    canary NS --promote`` (or this step again without a canary) makes it live, ``--abort``
    ends it.
    """
    manifest = load_manifest(run_dir)
    if manifest.params.dry_run:
        return skip_step(manifest, "publish", "dry run")
    if is_shadow(manifest):
        report = manifest.reports.get("shadow_comparison", "not written")
        why = f"shadow run: version {manifest.version} stays unpublished; comparison: {report}"
        return skip_step(manifest, "publish", why)
    if manifest.version is None:
        raise RunError(f"Run {manifest.run_id} has no exported version", fix="Run export first")
    started = time.perf_counter()
    was_published = manifest.published
    settings = settings or load_run_settings()
    force = manifest.params.force if force is None else force
    store = open_run_store(manifest, settings)
    try:
        before = store.state(manifest.namespace).live
        if canary is not None and not manifest.published and before != manifest.version:
            return _as_canary(store, manifest, canary, before, force=force, started=started)
        info, note = _flip_live(store, manifest, before, force=force)
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
        canary=None,
        **collected,
    )
    manifest.save()
    where = f"namespace {manifest.namespace} in {manifest.store}"
    log.info("%s: version %s %s", where, manifest.version, note)
    return _publish_result(
        manifest, before, note, newly_published=note != PUBLISHED_EARLIER and not was_published
    )


def _publish_result(
    manifest: Manifest, before: int | None, note: str, *, newly_published: bool
) -> PublishResult:
    assert manifest.version is not None
    return {
        "run_dir": manifest.run_dir,
        "run_id": manifest.run_id,
        "namespace": manifest.namespace,
        "store": manifest.store,
        "model": f"{manifest.model.name}/{manifest.model.version}",
        "version": manifest.version,
        "previous": before,
        "note": note,
        "newly_published": newly_published,
    }


def _as_canary(
    store: PredictionStore,
    manifest: Manifest,
    percent: float,
    before: int | None,
    *,
    force: bool,
    started: float,
) -> PublishResult:
    """Start the run's version as a canary at ``percent`` % beside the live version; the
    live pointer is unchanged and the run is not published (its promotion publishes it).
    Starting the running canary again (a retry) changes nothing."""
    from kv_export.errors import VersionOutOfOrder

    assert manifest.version is not None
    try:
        state = store.start_canary(manifest.namespace, manifest.version, percent, force=force)
    except VersionOutOfOrder as exc:
        fix = (exc.fix or "").replace("RUN_FOLDER", manifest.run_dir)
        raise VersionOutOfOrder(exc.what, expected=exc.expected, fix=fix) from None
    assert state.canary is not None
    note = f"canary at {state.canary.percent:g} % beside live version {before}"
    manifest.record_step(
        "publish",
        seconds=time.perf_counter() - started,
        version=manifest.version,
        previous=before,
        store=manifest.store,
        note=note,
        forced=force,
        canary=state.canary.percent,
        collected_versions=[],
        collected_run_folders=[],
    )
    manifest.save()
    log.info(
        "namespace %s in %s: version %s %s",
        manifest.namespace,
        manifest.store,
        manifest.version,
        note,
    )
    return {
        **_publish_result(manifest, before, note, newly_published=False),
        "canary": state.canary.percent,
    }


def _flip_live(
    store: PredictionStore, manifest: Manifest, before: int | None, *, force: bool
) -> tuple[VersionInfo | None, str]:
    """Make the run's version live unless this run published before; what happened."""
    from kv_export.errors import AlreadyPublished, VersionOutOfOrder

    assert manifest.version is not None
    if manifest.published and before != manifest.version:  # a run publishes once
        log.warning("run %s published v%s before; not again", manifest.run_id, manifest.version)
        return None, PUBLISHED_EARLIER
    try:
        info = store.publish(
            manifest.namespace, manifest.version, manifest.params.keep_versions, force=force
        )
    except AlreadyPublished as exc:
        log.warning("%s", exc)
        return None, PUBLISHED_EARLIER
    except VersionOutOfOrder as exc:
        fix = (exc.fix or "").replace("RUN_FOLDER", manifest.run_dir)
        raise VersionOutOfOrder(exc.what, expected=exc.expected, fix=fix) from None
    return info, "already live" if before == manifest.version else "published"


def collect_garbage(store: PredictionStore, manifest: Manifest, settings: RunSettings) -> Collected:
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
            manifest.run_dir,
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
        "collected_run_folders": folders,
    }


#: A hidden temporary file or object (``storage.put_bytes``) older than this is what a
#: writer killed between its upload and its copy left: its writer is gone for good (an
#: upload is listed only once complete, and copied to its name at once).
STAGED_GRACE_SECONDS = 3600.0


def collect_run_folders(
    run_dir: str | Path,
    state: NamespaceState,
    store_label: str,
    keep_days: float,
    now: float | None = None,
    *,
    staged_grace_seconds: float = STAGED_GRACE_SECONDS,
) -> list[str]:
    """Delete the namespace's run folders that nothing needs; return them (paths or URLs).

    A folder goes when all hold: unchanged for ``keep_days`` days (its newest file or
    object); no version record of this store (live, kept, in flight or being deleted)
    names its run or lies in it (the lookup API's batch fallback reads the parts of the
    live and kept versions); and its manifest records no version in another store (whose
    retention this store cannot see: such folders are left alone). The current run's
    never goes. In the folders that stay, hidden temporary files older than
    ``staged_grace_seconds`` (left by a writer killed before its rename or copy) go.

    Nothing looks complete that is not: a local folder is renamed out of sight in one
    step before it is deleted; on an object store, where a prefix is deleted object by
    object, the manifest goes first, so a folder cut short is no run (no step, lookup or
    ``status`` takes it for one) and the next collection deletes what is left of it.
    """
    infos = [*state.versions.values(), *state.deleting.values()]
    runs = {info.run_id for info in infos}
    needed = [p for info in infos for p in (info.output_dir, *(x.path for x in info.parts)) if p]
    now = now or time.time()
    cutoff = now - keep_days * 86400
    root = storage.parent_of(run_dir)
    listed = storage.files_under(root)  # before any deletion: one listing on a store
    if storage.is_remote(run_dir):
        gone = _collect_on_store(str(run_dir), listed, runs, needed, store_label, cutoff)
    else:
        gone = _collect_local(Path(run_dir), runs, needed, store_label, cutoff)
    _delete_staged(root, listed, {storage.name_of(f) for f in gone}, now - staged_grace_seconds)
    return gone


def _collect_local(
    run_dir: Path, runs: set[str], needed: list[str], store_label: str, cutoff: float
) -> list[str]:
    gone: list[str] = []
    for folder in sorted(run_dir.parent.iterdir()):
        if folder == run_dir or not folder.is_dir() or folder.name.startswith("."):
            continue
        changed = max(p.stat().st_mtime for p in (folder, folder / MANIFEST) if p.exists())
        if changed > cutoff or _needed(str(folder), runs, needed, store_label):
            continue
        trash = folder.with_name(f".deleting-{folder.name}")
        folder.rename(trash)  # one step out of sight; a crash leaves only the trash
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(str(folder))
    for trash in run_dir.parent.glob(".deleting-*"):
        shutil.rmtree(trash, ignore_errors=True)
    return gone


def _collect_on_store(
    run_dir: str,
    listed: list[storage.Entry],
    runs: set[str],
    needed: list[str],
    store_label: str,
    cutoff: float,
) -> list[str]:
    """Each folder's age is its newest object's (a prefix has no time of its own)."""
    root = storage.parent_of(run_dir)
    newest: dict[str, int] = {}
    for entry in listed:
        name, _, rest = entry.name.partition("/")
        if rest:  # an object of a run folder, not one beside the folders
            newest[name] = max(newest.get(name, 0), entry.mtime_ns)
    gone: list[str] = []
    for name, changed_ns in sorted(newest.items()):
        folder = storage.join(root, name)
        if name == storage.name_of(run_dir) or name.startswith("."):
            continue
        if changed_ns / 1e9 > cutoff or _needed(folder, runs, needed, store_label):
            continue
        storage.delete(storage.join(folder, MANIFEST))  # first: what is left is no run
        storage.delete_tree(folder)
        gone.append(folder)
    return gone


def _needed(folder: str, runs: set[str], needed: list[str], store_label: str) -> bool:
    """Whether a version of this store, or a record of another store, keeps ``folder``."""
    if storage.name_of(folder) in runs or any(storage.is_within(p, folder) for p in needed):
        return True
    return _in_another_store(folder, store_label)


def _delete_staged(root: str, listed: list[storage.Entry], gone: set[str], cutoff: float) -> None:
    """Delete the hidden temporary files of the run folders that stay, written before
    ``cutoff`` (the current run's too: a killed attempt of it may have left some)."""
    for entry in listed:
        folder, _, rest = entry.name.partition("/")
        if not rest or folder in gone or folder.startswith("."):
            continue
        if storage.is_temporary(entry.name) and entry.mtime_ns / 1e9 < cutoff:
            location = storage.join(root, entry.name)
            storage.delete(location)
            log.info("deleted %s, left by a writer killed before it finished", location)


def _in_another_store(folder: str, store_label: str) -> bool:
    if not storage.exists(storage.join(folder, MANIFEST)):
        return False
    try:
        manifest = load_manifest(folder)
    except (RunError, ValueError, OSError):
        return True  # unreadable: keep it, someone should look at it
    return any(
        r.version is not None for label, r in manifest.stores.items() if label != store_label
    )
