"""The drift gate: a run whose outputs moved too far from the live version's stops here.

It runs after validation and before export (``jobs.flow.validate_and_gate``); a shadow
run skips it (its comparison is ``jobs.shadow.compare``, after its export).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from batchscore.core.settings import RunSettings
from jobs.context import local_folder, open_run_store, quality_rules, require_scored
from jobs.manifest import Manifest, load_manifest
from jobs.results import DriftResult

if TYPE_CHECKING:
    from kv_export.store import VersionInfo
    from scoring.drift import OutputDrift
    from scoring.quality import DriftRules

log = logging.getLogger("batchscore.jobs")


def check_drift(run_dir: str | Path, settings: RunSettings | None = None) -> DriftResult:
    """Gate the run on drift against the namespace's live version; ``force`` overrides.

    Reads the live version's output parts (``VersionInfo.parts``) and this run's,
    per output compares the distributions and the key-joined predictions, writes a
    PNG of both, and records everything in ``manifest.drift``. No live version, or
    this run already live: nothing to compare, the gate passes. A blocked run keeps
    its output on disk; the live version is untouched.
    """
    from scoring.errors import DriftDetected

    manifest = load_manifest(run_dir)
    require_scored(manifest)
    started = time.perf_counter()
    rules = quality_rules(manifest).drift
    live = _live_version(manifest, settings)
    compare = rules.enabled and live is not None and live.run_id != manifest.run_id
    results, plot = _judge_outputs(manifest, live, compare, rules)
    drifted = [r for r in results if r.drifted]
    overridden = bool(drifted) and manifest.params.force
    manifest.reports["distributions_png"] = str(plot)
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


def _live_version(manifest: Manifest, settings: RunSettings | None) -> VersionInfo | None:
    store = open_run_store(manifest, settings)
    try:
        return store.state(manifest.namespace).live_info()
    finally:
        store.close()


def _judge_outputs(
    manifest: Manifest, live: VersionInfo | None, compare: bool, rules: DriftRules
) -> tuple[list[OutputDrift], Path]:
    """Per output shared with ``live`` (when ``compare``), the gate's verdict; and the
    plot of both distributions (the run's alone when not compared)."""
    from scoring.drift import judge, read_samples
    from scoring.reports import plot_distributions

    key = manifest.params.key_column
    samples = read_samples(
        [p.path for p in live.parts] if compare and live is not None else [],
        [s.part for s in manifest.shards if s.state == "done"],  # paths or object URLs
        key,
        live.key_column if live is not None else key,
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
        local_folder(manifest, "reports") / "distributions.png",
        f"{manifest.namespace}: live v{live.version if live else '-'} vs run {manifest.run_id}",
    )
    return results, plot


def run_reports(run_dir: str | Path) -> dict[str, str]:
    """The run's report files (Data Docs index, plots), as recorded in the manifest."""
    return dict(load_manifest(run_dir).reports)


def _drift_note(compare: bool, results: list[OutputDrift], overridden: bool) -> str:
    if not compare:
        return "no live version to compare"
    worst = max(results, key=lambda r: r.distance / (r.max_distance or 1), default=None)
    if worst is None:
        return "not compared: the live output is gone from disk or shares no output"
    state = "OVERRIDDEN" if overridden else ("drifted" if worst.drifted else "ok")
    return f"{state}: {worst.metric} {worst.distance:.3f}, moved {worst.moved_share:.1%}"
