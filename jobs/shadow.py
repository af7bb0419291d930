"""Shadow scoring: a candidate model scores a run beside the live version; nothing goes live.

A shadow run is an ordinary run (resolve → plan → score → validate → export) whose model
pin is a candidate such as ``models:/churn@challenger``. Its version is loaded into the
store but never published (``publishing.publish`` refuses a shadow run), and ``compare``
writes a report against the namespace's live version: per output, the share of keys
whose prediction changed, the share that moved by more than the drift delta, the KS and
PSI distances between the two distributions, whether the drift gate would have blocked
it, and a plot of both. Promoting the candidate is a registry action (``batchscore model
promote``); the next regular run then scores and publishes with it.

A run is a shadow run when its manifest has a ``shadow`` step record, written by ``mark``
right after the run is resolved (``jobs.flow.start_run``). ``candidate_uri`` turns what a
user gives (``challenger``, or a model URI) into the candidate's URI, for the CLI and
the DAG alike; this module imports nothing heavy at its top (MLflow's URI parser is
imported when ``candidate_uri`` needs the live model's name).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from batchscore.core.settings import RunSettings
from jobs.context import SHADOW_STEP, is_shadow, open_run_store, quality_rules
from jobs.errors import RunError
from jobs.manifest import Manifest, load_manifest
from registry.uris import parse_model_uri

if TYPE_CHECKING:
    import numpy as np

    from kv_export.store import VersionInfo
    from scoring.drift import Samples
    from scoring.quality import DriftRules

__all__ = ["SHADOW_STEP", "candidate_uri", "compare", "is_shadow", "mark"]

log = logging.getLogger("batchscore.jobs")

CHANGED_TOLERANCE = 1e-6  # a prediction "changed" when it moved by more than this
REPORT = "shadow_comparison.json"
PLOT = "shadow_distributions.png"


def mark(run_dir: str | Path, *, candidate: str, live_model: str) -> None:
    """Record that this run scores ``candidate`` in the shadow of ``live_model``; idempotent."""
    manifest = load_manifest(run_dir)
    if is_shadow(manifest):
        return
    manifest.record_step(
        SHADOW_STEP,
        seconds=0.0,
        candidate=candidate,
        pinned=manifest.model.uri,
        live_model=live_model,
        compared=False,
    )
    manifest.save()
    log.info("shadow run of %s (pinned %s) beside %s", candidate, manifest.model.uri, live_model)


def candidate_uri(model_uri: str, shadow: str | None) -> str | None:
    """A shadow candidate as a model URI: a bare alias names an alias of the live model.

    ``candidate_uri("models:/churn@champion", "challenger") == "models:/churn@challenger"``;
    a model URI (``models:/`` or ``runs:/``) is taken as it is; None or empty: no shadow
    run. A bare alias needs a live model that is registered (it has aliases).
    """
    if not shadow:
        return None
    if shadow.startswith(("models:/", "runs:/")):
        return shadow
    live = parse_model_uri(model_uri)
    if live.name is None:
        raise RunError(
            f"The shadow candidate '{shadow}' is an alias, but the model {model_uri} is not "
            "a registered model's",
            expected="a model URI as the candidate (models:/..., runs:/...)",
            fix="Give the candidate's full model URI (--shadow models:/<name>@<alias>)",
        )
    return f"models:/{live.name}@{shadow}"


class ShadowReport(TypedDict):
    """``reports/shadow_comparison.json``; ``path`` is where it was written."""

    namespace: str
    run_id: str
    candidate: dict[str, object]
    live: dict[str, object] | None
    compared: bool
    note: str
    rules: dict[str, object]
    outputs: list[dict[str, Any]]
    plot: str
    promote: str
    path: str


def compare(run_dir: str | Path, settings: RunSettings | None = None) -> ShadowReport:
    """Compare the run's output with the namespace's live version; write the report.

    Reads the live version's output parts (``VersionInfo.parts``) and this run's, joins
    them on the key (samples of ``drift.sample_rows`` rows when larger) and writes
    ``reports/shadow_comparison.json`` and ``reports/shadow_distributions.png``. Without a
    live version the report says so and shows the candidate's distribution alone.
    """
    from scoring.reports import plot_distributions

    manifest = load_manifest(run_dir)
    started = time.perf_counter()
    live = _live_version(settings, manifest)
    rules = quality_rules(manifest).drift
    samples, outputs = _compare_outputs(manifest, live, rules)
    reports = Path(manifest.run_dir) / "reports"
    plot = plot_distributions(
        samples.new,
        samples.live,
        reports / PLOT,
        f"{manifest.namespace}: live v{live.version if live else '-'} vs candidate "
        f"{manifest.model.name} v{manifest.model.version}",
    )
    path = reports / REPORT
    report = _report(manifest, live, rules, outputs, plot, path)
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "path"}, indent=2))
    manifest.reports["shadow_comparison"] = str(path)
    manifest.reports["shadow_distributions_png"] = str(plot)
    manifest.steps[SHADOW_STEP] |= {
        "compared": report["compared"],
        "live_version": report["live"]["version"] if report["live"] else None,
        "note": report["note"],
        "report": str(path),
        "seconds": time.perf_counter() - started,
    }
    manifest.save()
    log.info("shadow comparison of run %s: %s", manifest.run_id, report["note"])
    return report


def _live_version(settings: RunSettings | None, manifest: Manifest) -> VersionInfo | None:
    store = open_run_store(manifest, settings)
    try:
        return store.state(manifest.namespace).live_info()
    finally:
        store.close()


def _compare_outputs(
    manifest: Manifest, live: VersionInfo | None, rules: DriftRules
) -> tuple[Samples, list[dict[str, Any]]]:
    """Per output: changed share, moved share and the gate's verdict, KS and PSI."""
    from scoring.drift import judge, ks, moved_share, psi, read_samples

    new_parts = [Path(s.part) for s in manifest.shards if s.state == "done"]
    live_parts = [Path(p.path) for p in live.parts] if live is not None else []
    key = manifest.params.key_column
    samples = read_samples(
        live_parts,
        new_parts,
        key,
        live.key_column if live is not None else key,
        manifest.model.outputs,
        rules.sample_rows,
    )
    outputs = []
    for name in manifest.model.outputs:
        if name not in samples.live:
            continue
        old, new = samples.live_joined[name], samples.new_joined[name]
        verdict = judge(name, samples.live[name], samples.new[name], old, new, rules)
        outputs.append(
            verdict.to_dict()
            | {
                "changed_share": moved_share(old, new, CHANGED_TOLERANCE),
                "ks": ks(samples.live[name], samples.new[name]),
                "psi": psi(samples.live[name], samples.new[name]),
                "mean_live": _mean(samples.live[name]),
                "mean_candidate": _mean(samples.new[name]),
            }
        )
    return samples, outputs


def _mean(values: np.ndarray) -> float | None:
    import numpy as np

    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def _report(
    manifest: Manifest,
    live: VersionInfo | None,
    rules: DriftRules,
    outputs: list[dict[str, Any]],
    plot: Path,
    path: Path,
) -> ShadowReport:
    record = manifest.steps[SHADOW_STEP]
    alias = str(record.get("live_model", "")).partition("@")[2] or "champion"
    return {
        "namespace": manifest.namespace,
        "run_id": manifest.run_id,
        "candidate": {
            "requested": record.get("candidate"),
            "model": manifest.model.name,
            "version": manifest.model.version,
            "store_version": manifest.version,
        },
        "live": None
        if live is None
        else {
            "version": live.version,
            "run_id": live.run_id,
            "model": live.model_name,
            "model_version": live.model_version,
            "keys": live.key_count,
        },
        "compared": bool(outputs),
        "note": _note(live, outputs),
        "rules": vars(rules),
        "outputs": outputs,
        "plot": str(plot),
        "promote": _promote_command(manifest, alias),
        "path": str(path),
    }


def _promote_command(manifest: Manifest, alias: str) -> str:
    """How to make the candidate live; a model outside the registry is registered first."""
    model = manifest.model
    if model.source == "registry":
        return f"batchscore model promote {model.name} {model.version} --alias {alias}"
    return f"batchscore model register {model.uri} NAME --alias {alias}"


def _note(live: VersionInfo | None, outputs: list[dict[str, Any]]) -> str:
    if live is None:
        return "namespace has no live version: nothing to compare"
    if not outputs:
        return f"live version {live.version} shares no output or its parts are gone from disk"
    worst = max(outputs, key=lambda o: o["changed_share"])
    return (
        f"vs live v{live.version}: {worst['changed_share']:.1%} of {worst['joined_keys']:,} "
        f"keys changed, {worst['moved_share']:.1%} moved by more than {worst['moved_delta']:g}, "
        f"KS {worst['ks']:.3f}, PSI {worst['psi']:.3f} ('{worst['output']}'); the drift gate "
        + ("would block it" if any(o["drifted"] for o in outputs) else "would pass it")
    )
