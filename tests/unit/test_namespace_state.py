"""The pure publish/rollback/retention rules every store shares."""

from __future__ import annotations

import pytest

from kv_export.errors import (
    AlreadyPublished,
    VersionExpired,
    VersionIncomplete,
    VersionNotFound,
    VersionOutOfOrder,
)
from kv_export.state import NamespaceState, NewVersion


def new(run: str, data_as_of: str | None = None) -> NewVersion:
    return NewVersion(
        run_id=run,
        expected_keys=10,
        outputs=["p"],
        model_name="m",
        model_version="1",
        scored_at="2026-11-23T00:00:00+00:00",
        key_column="k",
        data_as_of=data_as_of,
    )


def loaded(state: NamespaceState, run: str) -> tuple[NamespaceState, int]:
    state, info = state.begin(new(run))
    return state.complete("ns", info.version, 10), info.version


def test_a_retried_run_gets_its_own_version_back() -> None:
    state, first = NamespaceState().begin(new("r1"))
    again, second = state.begin(new("r1"))
    assert again is state and second.version == first.version
    _, other = state.begin(new("r2"))
    assert other.version == first.version + 1


def test_publish_refuses_unknown_and_incomplete_versions() -> None:
    state, info = NamespaceState().begin(new("r1"))
    with pytest.raises(VersionIncomplete, match="state 'loading'"):
        state.publish("ns", info.version, keep=2)
    with pytest.raises(VersionNotFound, match="no version 9"):
        state.publish("ns", 9, keep=2)


def test_publish_flips_live_and_keeps_the_last_n() -> None:
    state = NamespaceState()
    versions = []
    for run in ("r1", "r2", "r3"):
        state, v = loaded(state, run)
        state, dropped = state.publish("ns", v, keep=2)
        versions.append(v)
    assert state.live == versions[-1]
    assert state.history == versions[-2:]
    assert versions[0] not in state.versions and "r1" not in state.runs


def test_publishing_the_live_version_again_changes_nothing() -> None:
    state, v = loaded(NamespaceState(), "r1")
    state, _ = state.publish("ns", v, keep=2)
    same, dropped = state.publish("ns", v, keep=2)
    assert same is state and dropped == []


def test_an_old_version_is_not_published_twice() -> None:
    state, v1 = loaded(NamespaceState(), "r1")
    state, _ = state.publish("ns", v1, keep=3)
    state, v2 = loaded(state, "r2")
    state, _ = state.publish("ns", v2, keep=3)
    with pytest.raises(AlreadyPublished, match="rollback"):
        state.publish("ns", v1, keep=3)


def test_rollback_goes_back_one_and_can_go_to_a_kept_version() -> None:
    state = NamespaceState()
    for run in ("r1", "r2", "r3"):
        state, v = loaded(state, run)
        state, _ = state.publish("ns", v, keep=3)
    back = state.rollback("ns")
    assert back.live == 2 and back.history == [1, 2]
    assert state.rollback("ns", to=1).live == 1
    with pytest.raises(VersionNotFound):
        NamespaceState().rollback("ns")


def test_rollback_needs_a_kept_previous_version() -> None:
    state, v = loaded(NamespaceState(), "r1")
    state, _ = state.publish("ns", v, keep=1)
    with pytest.raises(VersionNotFound, match="KEEP_VERSIONS"):
        state.rollback("ns")


def test_unpublished_versions_survive_retention() -> None:
    state, pending = NamespaceState().begin(new("in-flight"))
    for run in ("r1", "r2", "r3"):
        state, v = loaded(state, run)
        state, _ = state.publish("ns", v, keep=1)
    assert pending.version in state.versions


# Issue 16 items 12-14: versions go live in order (DESIGN invariant 9), expired versions
# are never made live, orphaned loading versions are collected after a grace period.

D1, D2, D3 = "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00", "2026-11-03T00:00:00+00:00"


def dated(state: NamespaceState, run: str, data_as_of: str) -> tuple[NamespaceState, int]:
    state, info = state.begin(new(run).model_copy(update={"data_as_of": data_as_of}))
    return state.complete("ns", info.version, 10), info.version


def test_an_older_run_never_replaces_a_newer_live_version() -> None:
    state, old = dated(NamespaceState(), "day-1", D1)  # exported first, published last
    state, newer = dated(state, "day-2", D2)
    state, _ = state.publish("ns", newer, keep=3)
    with pytest.raises(VersionOutOfOrder, match=r"(?si)version 1.*2026-11-01.*version 2.*--force"):
        state.publish("ns", old, keep=3)
    assert state.live == newer


def test_force_publishes_an_older_run_and_keeps_the_order_floor() -> None:
    state, old = dated(NamespaceState(), "day-1", D1)
    state, newer = dated(state, "day-2", D2)
    state, _ = state.publish("ns", newer, keep=3)
    forced, _ = state.publish("ns", old, keep=3, force=True)
    assert forced.live == old
    # The operator chose day 1 over day 2; day 1.5 is still older than day 2: refused.
    forced, middle = dated(forced, "day-1.5", "2026-11-01T12:00:00+00:00")
    with pytest.raises(VersionOutOfOrder):
        forced.publish("ns", middle, keep=3)


def test_a_rollback_pins_the_namespace_until_a_newer_run() -> None:
    state = NamespaceState()
    for run, day in (("day-1", D1), ("day-2", D2)):
        state, v = dated(state, run, day)
        state, _ = state.publish("ns", v, keep=3)
    state = state.rollback("ns")  # back to day 1: day 2 was bad
    state, late = dated(state, "day-1-rerun", "2026-11-01T06:00:00+00:00")
    with pytest.raises(VersionOutOfOrder, match="rollback"):
        state.publish("ns", late, keep=3)
    assert state.live == 1
    state, newest = dated(state, "day-3", D3)
    state, _ = state.publish("ns", newest, keep=3)
    assert state.live == newest


def test_an_expired_version_is_neither_published_nor_rolled_back_to() -> None:
    from datetime import UTC, datetime, timedelta

    state, v1 = dated(NamespaceState(), "day-1", D1)
    state, _ = state.publish("ns", v1, keep=3)
    state = state.set_ttl(60)
    state, v2 = dated(state, "day-2", D2)
    state, v3 = dated(state, "day-3", D3)
    state, _ = state.publish("ns", v2, keep=3)
    later = datetime.now(UTC) + timedelta(seconds=120)
    with pytest.raises(VersionExpired, match="Version 3"):
        state.publish("ns", v3, keep=3, now=later)
    state, _ = state.publish("ns", v3, keep=3)
    with pytest.raises(VersionExpired, match="Version 2"):
        state.rollback("ns", now=later)
    assert state.rollback("ns", to=v1, now=later).live == v1  # loaded before the TTL


def test_gc_drops_an_orphaned_loading_version_only_after_the_grace_period() -> None:
    from datetime import UTC, datetime, timedelta

    state, orphan = NamespaceState().begin(new("crashed"))
    state, v = dated(state, "day-2", D2)
    state, _ = state.publish("ns", v, keep=3)
    same, doomed = state.gc(keep=3, loading_grace_seconds=3600)
    assert orphan.version in same.versions and doomed == []
    later = datetime.now(UTC) + timedelta(hours=2)
    spared, doomed = state.gc(keep=3, now=later, loading_grace_seconds=3600, spare_run="crashed")
    assert orphan.version in spared.versions and doomed == []
    after, doomed = state.gc(keep=3, now=later, loading_grace_seconds=3600)
    assert [info.version for info in doomed] == [orphan.version]
    assert orphan.version not in after.versions and "crashed" not in after.runs


def test_gc_keeps_a_complete_newer_run_that_began_before_the_live_one() -> None:
    state, newer = dated(NamespaceState(), "day-2", D2)  # began first, loads slowly
    state, old = dated(state, "day-1", D1)
    state, _ = state.publish("ns", old, keep=3)
    state, doomed = state.gc(keep=3)
    assert newer in state.versions and doomed == []
    state, _ = state.publish("ns", newer, keep=3)
    assert state.live == newer
