"""The drift gate: a run whose outputs moved too far from the live version's stops here.

It runs after validation and before export (``jobs.flow.validate_and_gate``); a shadow
run skips it (its comparison is ``jobs.shadow.compare``, after its export).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscore.core.settings import RunSettings
from jobs.context import local_folder, open_run_store, quality_rules, require_scored
from jobs.manifest import Manifest, load_manifest
from jobs.results import DriftResult

if TYPE_CHECKING:
    import numpy as np

    from kv_export.store import VersionInfo
    from scoring.drift import OutputDrift, Samples
    from scoring.quality import DriftRules

log = logging.getLogger("batchscore.jobs")

PLOT_JOB = "distributions-job.npz"  # beside the PNG: the samples of a plot left for later


def check_drift(
    run_dir: str | Path, settings: RunSettings | None = None, *, plot_later: bool = False
) -> DriftResult:
    """Gate the run on drift against the namespace's live version; ``force`` overrides.

    Reads the live version's output parts (``VersionInfo.parts``) and this run's,
    per output compares the distributions and the key-joined predictions, writes a
    PNG of both, and records everything in ``manifest.drift``. No live version, or
    this run already live: nothing to compare, the gate passes. A blocked run keeps
    its output on disk; the live version is untouched.

    With ``plot_later`` (the DAG's validate task, whose Data Docs its ``reports`` task
    builds) a run the gate lets through leaves its plot to that task: the samples are
    written beside the PNG to be (``plot_job``, ``plot_left``), and matplotlib's import
    and drawing stay off the run's critical path. A blocked run's plot is drawn here:
    its error names it.
    """
    from scoring.errors import DriftDetected

    manifest = load_manifest(run_dir)
    require_scored(manifest)
    started = time.perf_counter()
    rules = quality_rules(manifest).drift
    live = _live_version(manifest, settings)
    compare = rules.enabled and live is not None and live.run_id != manifest.run_id
    results, samples = _judge_outputs(manifest, live, compare, rules)
    drifted = [r for r in results if r.drifted]
    overridden = bool(drifted) and manifest.params.force
    plot = local_folder(manifest, "reports") / "distributions.png"
    title = f"{manifest.namespace}: live v{live.version if live else '-'} vs run {manifest.run_id}"
    later: dict[str, str] = {}
    if plot_later and (overridden or not drifted):
        later["plot_job"] = str(_write_plot_job(plot, title, samples.new, samples.live))
    else:
        from scoring.reports import plot_distributions

        plot_distributions(samples.new, samples.live, plot, title)
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
        **later,
    )
    manifest.save()
    log.info("drift plot: file://%s%s", plot, " (drawn by the reports task)" if later else "")
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
) -> tuple[list[OutputDrift], Samples]:
    """Per output shared with ``live`` (when ``compare``), the gate's verdict; and the
    samples the plot of both distributions is drawn from (the run's alone when not
    compared)."""
    from scoring.drift import judge, read_samples

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
    return results, samples


def _write_plot_job(
    plot: Path, title: str, new: dict[str, np.ndarray], live: dict[str, np.ndarray]
) -> Path:
    """The samples a plot is drawn from, beside the PNG to be (``plot_left`` draws it):
    one ``.npz`` of plain arrays, the PNG's path and title among them as text."""
    import numpy as np

    job = plot.with_name(PLOT_JOB)
    job.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"png": np.array(str(plot)), "title": np.array(title)}
    arrays |= {f"new:{name}": values for name, values in new.items()}
    arrays |= {f"live:{name}": values for name, values in live.items()}
    temporary = job.with_name(f".{job.name}.tmp.npz")
    np.savez(temporary, allow_pickle=False, **arrays)
    temporary.replace(job)  # a job that exists is complete
    return job


def plot_left(step: dict[str, Any]) -> Path:
    """Draw the plot that the drift step left (``plot_job`` in its record: the DAG's
    ``reports`` task, ``jobs.data_docs.build_left``); its path."""
    import numpy as np

    from scoring.reports import plot_distributions

    with np.load(step["plot_job"], allow_pickle=False) as job:
        new = {k.split(":", 1)[1]: job[k] for k in job.files if k.startswith("new:")}
        live = {k.split(":", 1)[1]: job[k] for k in job.files if k.startswith("live:")}
        return plot_distributions(new, live, Path(str(job["png"])), str(job["title"]))


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
