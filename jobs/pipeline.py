"""The whole pipeline in one process (``batchscore run``), on the DAG's code path."""

from __future__ import annotations

from batchscore.core.settings import RunSettings
from jobs import steps
from jobs.manifest import Manifest, RunParams, load_manifest


def run_pipeline(
    settings: RunSettings,
    params: RunParams,
    *,
    run_id: str | None = None,
    on_progress: steps.Progress | None = None,
) -> Manifest:
    ref = steps.resolve(settings, params, run_id)
    run_dir = ref["run_dir"]
    steps.plan(run_dir)
    steps.score(run_dir, on_progress=on_progress)
    steps.validate(run_dir)
    # The caller's settings, not the environment's: a password from --store is only here.
    steps.check_drift(run_dir, settings)
    steps.export(run_dir, settings)
    steps.publish(run_dir, settings)
    return load_manifest(run_dir)
