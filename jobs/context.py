"""What the steps share besides the manifest: settings, the run's store, its quality rules.

The step modules (``steps``, ``drift_gate``, ``publishing``) and ``shadow`` all import
this module and none imports another; ``jobs.flow`` composes them. Light at its top
(the DAG files import ``jobs.shadow.candidate_uri`` when they are parsed): the store
and scoring modules are imported where they are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from batchscore.core import storage
from batchscore.core.settings import RunSettings
from jobs.errors import RunError
from jobs.manifest import Manifest
from jobs.results import Skipped

if TYPE_CHECKING:
    from kv_export.store import PredictionStore
    from scoring.quality import NamespaceQuality

#: A run is a shadow run when its manifest has a step record of this name
#: (``jobs.shadow.mark``, right after the run is resolved); it is never published.
SHADOW_STEP = "shadow"


def load_run_settings() -> RunSettings:
    """The settings of a step run without a caller's (an Airflow task, ``batchscore step``)."""
    from batchscore.core.settings import load_settings

    return load_settings(RunSettings)


def open_run_store(manifest: Manifest, settings: RunSettings | None = None) -> PredictionStore:
    """The run's store, opened the one way (``kv_export.connect``): the URL of the run's
    parameters, the password and other store settings of ``settings``."""
    from kv_export.connect import store_target

    return store_target(settings or load_run_settings(), manifest.params.store_url).open()


def check_store(settings: RunSettings, url: str) -> None:
    """Fail before any scoring when the run's store cannot be reached or refuses the
    credentials; the error names the store without its secret and the setting to use."""
    from kv_export.connect import store_target

    store = store_target(settings, url).open()
    try:
        store.ping()
    finally:
        store.close()


def quality_rules(manifest: Manifest) -> NamespaceQuality:
    """The namespace's output rules and drift rules, from the run's parameters."""
    from scoring.quality import DriftRules, load_quality_config, namespace_quality

    return namespace_quality(
        manifest.namespace,
        manifest.model.outputs,
        DriftRules(**manifest.params.drift),
        load_quality_config(manifest.params.quality_config),
    )


def is_shadow(manifest: Manifest) -> bool:
    return SHADOW_STEP in manifest.steps


def require_scored(manifest: Manifest) -> None:
    """Every shard has a complete part (or failed within ``max_failed_shards``)."""
    missing = [
        s.id
        for s in manifest.shards
        if s.state == "pending" or (s.state == "done" and not storage.exists(s.part))
    ]
    if not manifest.shards or missing:
        raise RunError(
            f"Run {manifest.run_id} is not completely scored",
            expected="a complete part for every shard",
            found=f"shards without a part: {missing[:10]}" if missing else "no shards",
            fix="Run the score step",
        )


def local_folder(manifest: Manifest, name: str) -> Path:
    """A folder of the run on this machine: in the run folder when that is local; under
    ``HOME/run-cache/NAMESPACE/RUN`` when the run folder is on an object store (the per-part
    check results and the Data Docs, which Great Expectations writes as local files)."""
    if not storage.is_remote(manifest.run_dir):
        return Path(manifest.run_dir) / name
    return load_run_settings().home / "run-cache" / manifest.namespace / manifest.run_id / name


def skip_step(manifest: Manifest, step: str, why: str) -> Skipped:
    """Record that ``step`` did nothing, and why."""
    manifest.record_step(step, seconds=0.0, skipped=why)
    manifest.save()
    return {"run_dir": manifest.run_dir, "skipped": why}
