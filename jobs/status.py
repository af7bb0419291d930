"""What ``batchscore status`` shows: the store's view of a namespace plus the last run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchscore.core.settings import RunSettings
from jobs.manifest import MANIFEST, Manifest
from kv_export.connect import store_target
from kv_export.errors import NamespaceNotFound
from kv_export.store import NamespaceState


def namespace_state(settings: RunSettings, namespace: str, store_url: str | None) -> NamespaceState:
    """The namespace's state in the store; ``NamespaceNotFound`` when the store holds
    nothing of it (never exported to, or a typo), naming the store without secrets."""
    target = store_target(settings, store_url)
    store = target.open()
    try:
        state = store.state(namespace)
        if state.seq == 0 and not state.versions and not state.deleting:
            known = store.namespaces()
            raise NamespaceNotFound(
                f"Store {target.label} holds no namespace '{namespace}'",
                expected=f"one of {sorted(known)}" if known else None,
                found="no namespaces" if not known else None,
                fix="Check the name and --store (BATCHSCORE_STORE_URL); a run publishes there",
            )
        return state
    finally:
        store.close()


def namespace_status(
    settings: RunSettings, namespace: str, store_url: str | None
) -> dict[str, Any]:
    label = store_target(settings, store_url).label
    state = namespace_state(settings, namespace, store_url)
    versions = [info.model_dump(exclude={"parts"}) for _, info in sorted(state.versions.items())]
    return {
        "namespace": namespace,
        "store": label,
        "live": state.live,
        "kept": state.history,
        "versions": versions,
        "last_run": _last_run(settings.runs_dir / namespace, label),
    }


def _last_run(folder: Path, store: str) -> dict[str, Any] | None:
    """The summary of the namespace's newest run that met this store (exported or
    published there); the newest run of all when none did."""
    manifests = sorted(folder.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    loaded = [Manifest.model_validate(json.loads(p.read_text())) for p in manifests]
    here = [m for m in loaded if store in m.stores] or loaded
    return here[-1].summary() if here else None
