"""The canary's pure rules: which key goes where, and every change of the namespace state."""

from __future__ import annotations

import zlib

import pytest

from kv_export.encoding import CANARY_SLOTS, canary_slot, encode_keys
from kv_export.errors import (
    AlreadyPublished,
    BadCanaryPercent,
    CanaryRefused,
    VersionIncomplete,
    VersionOutOfOrder,
)
from kv_export.state import Canary, NamespaceState, canary_percent
from tests.unit.test_namespace_state import new


def loaded(
    state: NamespaceState, run: str, data_as_of: str | None = None
) -> tuple[NamespaceState, int]:
    state, info = state.begin(new(run, data_as_of))
    return state.complete("ns", info.version, 10), info.version


def live_and_loaded() -> tuple[NamespaceState, int, int]:
    state, a = loaded(NamespaceState(), "a")
    state, _ = state.publish("ns", a, keep=3)
    state, b = loaded(state, "b")
    return state, a, b


def test_the_slot_is_the_crc_scaled_to_the_slots_the_same_in_every_process() -> None:
    # Fixed values: a change of the rule would move customers between versions mid-canary.
    assert [canary_slot(k) for k in (b"0", b"12345", b"customer-7")] == [
        (zlib.crc32(k) * CANARY_SLOTS) >> 32 for k in (b"0", b"12345", b"customer-7")
    ]
    assert canary_slot(b"12345") == 7967
    assert all(0 <= canary_slot(k) < CANARY_SLOTS for k in encode_keys(range(10_000)))


@pytest.mark.parametrize("percent", [0.01, 1, 10, 33.33, 50, 99.99])
def test_the_rule_is_one_comparison_of_the_crc_equal_to_the_slot_rule(percent: float) -> None:
    canary = Canary(version=2, percent=percent)
    for key in encode_keys(range(50_000)):
        assert canary.takes(key) == (canary_slot(key) < round(percent * 100))


def test_a_canarys_share_of_keys_is_close_to_its_percent_and_nested() -> None:
    keys = encode_keys(range(100_000))
    for percent in (1.0, 10.0, 50.0, 90.0):
        share = sum(Canary(version=2, percent=percent).takes(k) for k in keys) / len(keys)
        assert abs(share - percent / 100) < 0.01, (percent, share)
    ten = {k for k in keys if Canary(version=2, percent=10).takes(k)}
    fifty = {k for k in keys if Canary(version=2, percent=50).takes(k)}
    assert ten < fifty  # raising the share only adds keys: nobody flips back


@pytest.mark.parametrize("percent", [0, 100, -5, 150, 10.001])
def test_a_share_outside_zero_to_a_hundred_is_refused(percent: float) -> None:
    with pytest.raises(BadCanaryPercent, match="strictly between 0 and 100"):
        canary_percent(percent)
    state, _, b = live_and_loaded()
    with pytest.raises(BadCanaryPercent):
        state.start_canary("ns", b, percent)


def test_a_canary_leaves_the_live_version_and_routes_keys_by_the_rule() -> None:
    state, a, b = live_and_loaded()
    canaried = state.start_canary("ns", b, 10)
    assert canaried.live == a and canaried.history == [a]
    assert canaried.canary is not None and canaried.canary.version == b
    assert canaried.versions[b].published_at is None
    for key in encode_keys(range(1000)):
        info, is_canary = canaried.version_for(key)
        assert info is not None
        assert is_canary == (canary_slot(key) < 1000)
        assert info.version == (b if is_canary else a)
    assert state.canary is None  # pure: the old state is unchanged


def test_starting_the_running_canary_again_changes_nothing() -> None:
    state, _, b = live_and_loaded()
    canaried = state.start_canary("ns", b, 10)
    assert canaried.start_canary("ns", b, 10) is canaried
    assert canaried.start_canary("ns", b, 25) is canaried  # a retried run keeps the ramp


def test_bad_canary_changes_are_refused_with_the_state_unchanged() -> None:
    empty, only = loaded(NamespaceState(), "a")
    with pytest.raises(CanaryRefused, match="no live version"):
        empty.start_canary("ns", only, 10)
    state, a, b = live_and_loaded()
    with pytest.raises(CanaryRefused, match="no canary running"):
        state.promote("ns", keep=3)
    with pytest.raises(CanaryRefused, match="no canary running"):
        state.abort("ns")
    with pytest.raises(CanaryRefused, match="no canary running"):
        state.set_canary_percent("ns", 50)
    with pytest.raises(CanaryRefused, match="live already"):
        state.start_canary("ns", a, 10)
    canaried = state.start_canary("ns", b, 10)
    canaried, c = loaded(canaried, "c")
    with pytest.raises(CanaryRefused, match="has a canary running .*--abort"):
        canaried.start_canary("ns", c, 10)
    with pytest.raises(CanaryRefused, match="cannot publish version"):
        canaried.publish("ns", c, keep=3)
    with pytest.raises(CanaryRefused, match="cannot roll back"):
        canaried.rollback("ns")
    with pytest.raises(BadCanaryPercent):
        canaried.set_canary_percent("ns", 100)


def test_a_canary_is_refused_what_a_publish_is_refused() -> None:
    state, a = loaded(NamespaceState(), "a", "2026-12-02")
    state, _ = state.publish("ns", a, keep=3)
    state, info = state.begin(new("loading"))
    with pytest.raises(VersionIncomplete):
        state.start_canary("ns", info.version, 10)
    state, old = loaded(state, "old", "2026-12-01")
    with pytest.raises(VersionOutOfOrder):
        state.start_canary("ns", old, 10)
    forced = state.start_canary("ns", old, 10, force=True)
    promoted, _ = forced.promote("ns", keep=3)
    assert promoted.live == old
    assert promoted.newest is not None and promoted.newest.version == a  # forced: mark kept
    with pytest.raises(AlreadyPublished):
        promoted.start_canary("ns", a, 10)


def test_ramp_promote_and_abort() -> None:
    state, a, b = live_and_loaded()
    canaried = state.start_canary("ns", b, 10)
    ramped = canaried.set_canary_percent("ns", 50)
    assert ramped.canary is not None and ramped.canary.percent == 50
    assert ramped.canary.started_at == canaried.canary.started_at  # type: ignore[union-attr]
    assert ramped.set_canary_percent("ns", 50) is ramped
    for key in encode_keys(range(2000)):  # the rule follows the new share at once
        assert ramped.version_for(key)[1] == (canary_slot(key) < 5000)
        assert canaried.version_for(key)[1] == (canary_slot(key) < 1000)

    promoted, doomed = ramped.promote("ns", keep=3)
    assert promoted.canary is None and promoted.live == b and promoted.history == [a, b]
    assert promoted.versions[b].published_at is not None and doomed == []
    assert promoted.newest is not None and promoted.newest.version == b

    aborted = ramped.abort("ns")
    assert aborted.canary is None and aborted.live == a and b in aborted.versions
    assert aborted.versions[b].published_at is None


def test_publishing_the_canary_promotes_it() -> None:
    state, _, b = live_and_loaded()
    published, _ = state.start_canary("ns", b, 10).publish("ns", b, keep=3)
    assert published.live == b and published.canary is None


def test_gc_never_collects_the_canary_and_dropping_it_ends_the_canary() -> None:
    state, a = loaded(NamespaceState(), "a", "2026-12-02")
    state, _ = state.publish("ns", a, keep=1)
    state, old = loaded(state, "old", "2026-12-01")  # older data: gc's prey when not canary
    canaried = state.start_canary("ns", old, 10, force=True)
    kept, doomed = canaried.gc(keep=1)
    assert old in kept.versions and doomed == [] and kept.canary is not None
    _, doomed = canaried.abort("ns").gc(keep=1)
    assert [d.version for d in doomed] == [old]
    dropped = canaried.drop(old)
    assert dropped.canary is None and dropped.version_for(b"1")[0].version == a  # type: ignore[union-attr]


def test_a_state_written_before_canaries_reads_as_none() -> None:
    state, _, _ = live_and_loaded()
    raw = state.model_dump_json(exclude={"canary"})
    assert NamespaceState.model_validate_json(raw).canary is None
