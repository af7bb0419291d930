"""The pure publish/rollback/retention rules every store shares."""

from __future__ import annotations

import pytest

from kv_export.errors import AlreadyPublished, VersionIncomplete, VersionNotFound
from kv_export.store import NamespaceState, NewVersion


def new(run: str) -> NewVersion:
    return NewVersion(
        run_id=run,
        expected_keys=10,
        outputs=["p"],
        model_name="m",
        model_version="1",
        scored_at="2026-11-23T00:00:00+00:00",
        key_column="k",
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
