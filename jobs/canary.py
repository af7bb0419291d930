"""A namespace's canary after it started (``publishing.publish`` with a canary starts it):
move its share, promote it, abort it, and read how it fares.

Each change is one atomic change of the namespace state in the store
(``NamespaceState.set_canary_percent`` / ``promote`` / ``abort``); a refused one
(``CanaryRefused``, ``BadCanaryPercent``) leaves the state as it was. The CLI's ``canary``
command and the Airflow DAG's staged publish call these functions.

How the canary fares comes from two places, both in the issue's rule:

- ``answer_shares``: the lookup API's ``/metrics`` counters of answers by version and
  role (``batchscore_lookup_answers_total``), so the canary's share of answers, its
  not-found rate and error rate next to the live version's;
- ``canary_drift``: the drift between the two versions on the canary's keys, from the
  store (the keys come from the canary version's parts; values of both versions are
  read from the store, one multi-get per slice).
"""

from __future__ import annotations

import logging
import urllib.request
from typing import TypedDict

from batchscore.core import storage
from batchscore.core.settings import RunSettings
from kv_export.connect import store_target
from kv_export.store import NamespaceState, VersionInfo

log = logging.getLogger("batchscore.jobs")
ANSWERS = "batchscore_lookup_answers_total"


class CanaryResult(TypedDict):
    """What a canary change left: the namespace's live version and canary (None: none)."""

    namespace: str
    store: str
    live: int | None
    canary: int | None
    percent: float | None
    note: str


def _result(namespace: str, label: str, state: NamespaceState, note: str) -> CanaryResult:
    canary = state.canary
    return {
        "namespace": namespace,
        "store": label,
        "live": state.live,
        "canary": canary.version if canary else None,
        "percent": canary.percent if canary else None,
        "note": note,
    }


def set_share(
    settings: RunSettings, namespace: str, percent: float, store_url: str | None = None
) -> CanaryResult:
    """Move the running canary to ``percent`` % of the keys (keys in it stay when it grows)."""
    target = store_target(settings, store_url)
    store = target.open()
    try:
        state = store.set_canary_percent(namespace, percent)
    finally:
        store.close()
    assert state.canary is not None
    note = f"canary version {state.canary.version} at {state.canary.percent:g} %"
    log.info("namespace %s in %s: %s", namespace, target.label, note)
    return _result(namespace, target.label, state, note)


def promote(settings: RunSettings, namespace: str, store_url: str | None = None) -> CanaryResult:
    """Make the canary live in one step (as a publish: history, retention)."""
    target = store_target(settings, store_url)
    store = target.open()
    try:
        before = store.state(namespace).live
        info = store.promote_canary(namespace, settings.keep_versions)
        state = store.state(namespace)
    finally:
        store.close()
    note = f"canary version {info.version} promoted: live {before} → {info.version}"
    log.info("namespace %s in %s: %s", namespace, target.label, note)
    _record_in_run(info, target.label, published=True)
    return _result(namespace, target.label, state, note)


def abort(settings: RunSettings, namespace: str, store_url: str | None = None) -> CanaryResult:
    """End the canary: every key is answered by the live version again."""
    target = store_target(settings, store_url)
    store = target.open()
    try:
        before = store.state(namespace)
        version = before.canary
        state = store.abort_canary(namespace)
    finally:
        store.close()
    aborted = before.canary_info()
    if aborted is not None:
        _record_in_run(aborted, target.label, published=False)
    note = f"canary version {version.version if version else None} aborted; live {state.live}"
    log.info("namespace %s in %s: %s", namespace, target.label, note)
    return _result(namespace, target.label, state, note)


def _record_in_run(info: VersionInfo, store_label: str, *, published: bool) -> None:
    """Tell the run whose version it is (its manifest, beside the version's parts, on
    disk or on an object store) that its canary was promoted (the run is then published,
    once) or aborted; a run folder that is gone, or that names another store or version,
    is left alone. The store's change is made already: a manifest that cannot be read or
    written is a warning, not a failed command (a later publish of the run finds its
    version live and publishes nothing twice)."""
    from jobs.errors import RunError

    if info.output_dir is None:
        return
    run_dir = storage.parent_of(info.output_dir)
    try:
        _update_run(run_dir, info, store_label, published=published)
    except (OSError, RunError, ValueError) as exc:
        log.warning(
            "the canary's run folder %s was not updated (%s: %s)",
            storage.public(run_dir),
            type(exc).__name__,
            exc,
        )


def _update_run(run_dir: str, info: VersionInfo, store_label: str, *, published: bool) -> None:
    from jobs.manifest import MANIFEST, load_manifest, utcnow

    if not storage.exists(storage.join(run_dir, MANIFEST)):
        return
    manifest = load_manifest(run_dir)
    record = manifest.stores.get(store_label)
    if record is None or record.version != info.version:
        return
    step = manifest.steps.get("publish", {})
    if published:
        record.published = True
        record.published_at = record.published_at or info.published_at
        step |= {"promoted_at": utcnow(), "canary": None, "note": "canary promoted: live"}
    else:
        step |= {"aborted_at": utcnow(), "note": "canary aborted: not published"}
    manifest.steps["publish"] = step
    manifest.save()


class RoleFigures(TypedDict):
    version: int
    answers: float  # keys answered, found or not, plus errors
    not_found_rate: float | None
    error_rate: float | None


class AnswerShares(TypedDict):
    """The API's counts for the namespace's live version and canary, and the canary's
    share of all answers of the two."""

    live: RoleFigures | None
    canary: RoleFigures | None
    canary_share: float | None


def read_metrics(api_url: str, timeout: float = 5.0) -> str:
    """The lookup API's ``/metrics`` text (``api_url`` is its base URL)."""
    with urllib.request.urlopen(api_url.rstrip("/") + "/metrics", timeout=timeout) as answer:
        text: str = answer.read().decode()
    return text


def answer_shares(metrics: str, namespace: str, state: NamespaceState) -> AnswerShares:
    """The canary's and the live version's answers, counted by the API since it started
    (all its workers), from the text of ``/metrics``."""
    counts: dict[tuple[str, str, str], float] = {}
    for line in metrics.splitlines():
        if not line.startswith(ANSWERS + "{"):
            continue
        labels = _labels(line[line.index("{") + 1 : line.rindex("}")])
        if labels.get("namespace") != namespace:
            continue
        key = (labels["version"], labels["role"], labels["outcome"])
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])

    def figures(version: int | None, role: str) -> RoleFigures | None:
        if version is None:
            return None
        by = {o: counts.get((str(version), role, o), 0.0) for o in ("found", "not_found", "error")}
        total = sum(by.values())
        return {
            "version": version,
            "answers": total,
            "not_found_rate": by["not_found"] / total if total else None,
            "error_rate": by["error"] / total if total else None,
        }

    live = figures(state.live, "live")
    canary = figures(state.canary.version if state.canary else None, "canary")
    both = (live["answers"] if live else 0.0) + (canary["answers"] if canary else 0.0)
    share = canary["answers"] / both if canary and both else None
    return {"live": live, "canary": canary, "canary_share": share}


def _labels(text: str) -> dict[str, str]:
    """Prometheus text-format labels (``a="x",b="y"``); values here hold no quotes."""
    pairs = (part.split("=", 1) for part in text.split(",") if "=" in part)
    return {name.strip(): value.strip().strip('"') for name, value in pairs}


class CanaryDrift(TypedDict):
    keys: int  # canary keys compared (found in both versions)
    missing_in_live: int  # canary keys the live version lacks
    max_abs_diff: float  # over every output
    mean_abs_diff: float
    outputs: list[str]


def canary_drift(
    settings: RunSettings,
    namespace: str,
    store_url: str | None = None,
    *,
    sample: int = 100_000,
    chunk: int = 10_000,
) -> CanaryDrift:
    """How far the canary's predictions are from the live version's on the canary's keys
    (at most ``sample`` of them, read from the canary version's parts in order)."""
    import numpy as np

    from kv_export.encoding import text_keys, unpack_value

    state = _state_with_canary(settings, namespace, store_url)
    live, canary = state.live_info(), state.canary_info()
    assert live is not None and canary is not None and state.canary is not None
    keys: list[bytes] = []
    for part in canary.parts:
        # a path or an object URL: through the storage layer, as every reader of parts
        column = storage.open_parquet(part.path).read(columns=[canary.key_column]).column(0)
        keys += [k for k in text_keys(column).to_pylist() if state.canary.takes(k)]
        if len(keys) >= sample:
            break
    keys = keys[:sample]
    shared = [o for o in canary.outputs if o in live.outputs]
    diffs: list[np.ndarray] = []
    missing = 0
    store = store_target(settings, store_url).open()
    try:
        for start in range(0, len(keys), chunk):
            part_keys = keys[start : start + chunk]
            old = store.get_many(namespace, live, part_keys)
            new = store.get_many(namespace, canary, part_keys)
            for a, b in zip(old, new, strict=True):
                if a is None:
                    missing += 1
                    continue
                if b is None:
                    continue
                was, now = unpack_value(a, live.outputs), unpack_value(b, canary.outputs)
                diffs.append(np.array([abs(now[o] - was[o]) for o in shared]))
    finally:
        store.close()
    matrix = np.vstack(diffs) if diffs else np.zeros((0, len(shared)))
    return {
        "keys": len(diffs),
        "missing_in_live": missing,
        "max_abs_diff": float(matrix.max()) if matrix.size else 0.0,
        "mean_abs_diff": float(matrix.mean()) if matrix.size else 0.0,
        "outputs": shared,
    }


def _state_with_canary(
    settings: RunSettings, namespace: str, store_url: str | None
) -> NamespaceState:
    from kv_export.errors import CanaryRefused

    store = store_target(settings, store_url).open()
    try:
        state = store.state(namespace)
    finally:
        store.close()
    if state.canary is None or state.canary_info() is None:
        raise CanaryRefused(
            f"Namespace '{namespace}' has no canary running: nothing to compare",
            expected="a canary started with --canary P%",
        )
    return state


class CanaryRules(TypedDict, total=False):
    """When a canary may be promoted (a job config's ``canary``): every bound given holds.

    ``max_mean_drift`` / ``max_drift``: the mean / largest absolute difference between the
    canary's and the live version's predictions on the canary's keys (``canary_drift``).
    With ``api_url``, the lookup API's counts since it started (``answer_shares``): the
    canary's ``max_error_rate`` and ``max_not_found_rate``, and at least ``min_answers``
    answers from it.
    """

    max_mean_drift: float
    max_drift: float
    api_url: str
    max_error_rate: float
    max_not_found_rate: float
    min_answers: int


class CanaryVerdict(TypedDict):
    namespace: str
    version: int
    passed: bool
    reasons: list[str]  # each bound that did not hold, in words; empty when passed
    drift: CanaryDrift
    answers: AnswerShares | None


def judge(
    settings: RunSettings,
    namespace: str,
    version: int,
    rules: CanaryRules,
    store_url: str | None = None,
) -> CanaryVerdict:
    """Check the running canary ``version`` of ``namespace`` against ``rules``.

    Raises ``CanaryRefused`` when ``version`` is not the running canary (an operator
    promoted or aborted it meanwhile): nothing is left to decide. The API's metrics that
    cannot be read raise ``OSError``: a retry may read them, and nothing is decided.
    """
    from kv_export.errors import CanaryRefused

    state = _state_with_canary(settings, namespace, store_url)
    assert state.canary is not None
    if state.canary.version != version:
        raise CanaryRefused(
            f"Version {version} of namespace '{namespace}' is no longer its canary "
            f"(the canary is version {state.canary.version})",
            fix="Someone changed the canary by hand; nothing is promoted or aborted",
        )
    drift = canary_drift(settings, namespace, store_url)
    reasons = []
    for bound, measured in (("max_mean_drift", "mean_abs_diff"), ("max_drift", "max_abs_diff")):
        limit = rules.get(bound)
        if limit is not None and drift[measured] > limit:  # type: ignore[literal-required]
            reasons.append(
                f"{measured} {drift[measured]:.4g} over {drift['keys']:,} canary keys is "  # type: ignore[literal-required]
                f"above {bound} {limit:g}"
            )
    answers = None
    if rules.get("api_url"):
        answers = answer_shares(read_metrics(rules["api_url"]), namespace, state)
        reasons += _answer_reasons(answers, rules)
    return {
        "namespace": namespace,
        "version": version,
        "passed": not reasons,
        "reasons": reasons,
        "drift": drift,
        "answers": answers,
    }


def _answer_reasons(answers: AnswerShares, rules: CanaryRules) -> list[str]:
    canary = answers["canary"]
    count = canary["answers"] if canary else 0.0
    reasons = []
    if count < rules.get("min_answers", 0):
        reasons.append(
            f"the canary answered {count:,.0f} keys, fewer than min_answers "
            f"{rules.get('min_answers')}"
        )
    for bound, measured in (
        ("max_error_rate", "error_rate"),
        ("max_not_found_rate", "not_found_rate"),
    ):
        limit = rules.get(bound)
        value = canary[measured] if canary else None  # type: ignore[literal-required]
        if limit is not None and value is not None and value > limit:
            reasons.append(f"the canary's {measured} {value:.2%} is above {bound} {limit:.2%}")
    return reasons
