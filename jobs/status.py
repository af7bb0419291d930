"""What ``batchscore status`` shows: the store's view of a namespace plus the last run."""

from __future__ import annotations

from typing import Any

from batchscore.core import storage
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
    settings: RunSettings, namespace: str, store_url: str | None, api_url: str | None = None
) -> dict[str, Any]:
    """The store's view of the namespace, its canary (with ``api_url``, the canary's share
    of the lookup API's answers) and the last run."""
    label = store_target(settings, store_url).label
    state = namespace_state(settings, namespace, store_url)
    versions = [info.model_dump(exclude={"parts"}) for _, info in sorted(state.versions.items())]
    return {
        "namespace": namespace,
        "store": label,
        "live": state.live,
        "kept": state.history,
        "versions": versions,
        **_canary(namespace, state, api_url),
        "last_run": _last_run(storage.join(settings.runs_location, namespace), label),
    }


def canary_status(
    settings: RunSettings, namespace: str, store_url: str | None, api_url: str | None = None
) -> dict[str, Any]:
    """The namespace's live version and canary (None: none running); with ``api_url`` the
    API's answers by role (``jobs.canary.answer_shares``)."""
    label = store_target(settings, store_url).label
    state = namespace_state(settings, namespace, store_url)
    return {
        "namespace": namespace,
        "store": label,
        "live": state.live,
        **_canary(namespace, state, api_url),
    }


def _canary(namespace: str, state: NamespaceState, api_url: str | None) -> dict[str, Any]:
    """``canary`` (version, percent, started_at, or None) and, when an API URL is given
    and a canary runs, ``answers`` from the API's /metrics, or ``answers_error`` saying
    why they could not be read (the status itself never fails on the API)."""
    from jobs.canary import answer_shares, read_metrics

    running = state.canary
    found: dict[str, Any] = {"canary": running.model_dump(exclude={"force"}) if running else None}
    if running is None or api_url is None:
        return found
    try:
        found["answers"] = answer_shares(read_metrics(api_url), namespace, state)
    except OSError as exc:
        found["answers_error"] = f"cannot read {api_url}/metrics: {exc}"
    return found


def _last_run(folder: str, store: str) -> dict[str, Any] | None:
    """The summary of the namespace's newest run that met this store (exported or
    published there); the newest run of all when none did. Run folders on an object store
    (``BATCHSCORE_OUTPUT_DIR=s3://...``) are listed there."""
    manifests = storage.run_files(folder, MANIFEST)
    loaded = [Manifest.model_validate_json(storage.read_bytes(m)) for m in manifests]
    here = [m for m in loaded if store in m.stores] or loaded
    return here[-1].summary() if here else None
