"""What ``batchscore status`` shows: the store's view of a namespace plus the last run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchscore.settings import RunSettings
from jobs.manifest import MANIFEST, Manifest
from kv_export.store import open_store


def namespace_status(
    settings: RunSettings, namespace: str, store_url: str | None
) -> dict[str, Any]:
    store = open_store(store_url or settings.resolved_store_url)
    try:
        state = store.state(namespace)
    finally:
        store.close()
    versions = [info.model_dump(exclude={"parts"}) for _, info in sorted(state.versions.items())]
    return {
        "namespace": namespace,
        "live": state.live,
        "kept": state.history,
        "versions": versions,
        "last_run": _last_run(settings.runs_dir / namespace),
    }


def _last_run(folder: Path) -> dict[str, Any] | None:
    manifests = sorted(folder.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        return None
    manifest = Manifest.model_validate(json.loads(manifests[-1].read_text()))
    return manifest.summary()
