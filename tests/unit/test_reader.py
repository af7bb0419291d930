"""The read-ahead of row groups: order, bounded depth, errors, early close, and its default."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchscore.core.settings import RunSettings
from jobs.steps import make_params
from scoring.engine import prefetch_depth
from scoring.reader import prefetch


def counted(n: int, produced: list[int], fail_at: int | None = None) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise OSError(f"row group {i} is unreadable")
        produced.append(i)
        yield i


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_items_come_in_order_whatever_the_depth(depth: int) -> None:
    assert list(prefetch(counted(50, []), depth)) == list(range(50))


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_the_producer_runs_depth_items_ahead_and_no_further(depth: int) -> None:
    """After each item taken, the producer fills the queue (``depth`` items) and holds one
    more it cannot put yet; it never produces beyond that. ``requested`` counts the items
    the consumer has asked for, so the bound holds even while ``next`` is returning."""
    requested = produced = 0
    overruns: list[tuple[int, int]] = []
    changed = threading.Condition()

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(100):
            with changed:
                if i > requested + depth:  # taken + queued + one in hand, at most
                    overruns.append((i, requested))
                produced = i + 1
                changed.notify_all()
            yield i

    def held_back() -> bool:  # the producer has gone as far as it may
        return produced >= requested + depth + 1

    items = prefetch(source(), depth)
    try:
        for taken in range(10):
            with changed:
                requested = taken + 1
            assert next(items) == taken
            with changed:
                assert changed.wait_for(held_back, 10), f"the producer stopped at {produced}"
                assert produced == requested + depth + 1
        assert overruns == []
    finally:
        items.close()


def test_a_producer_error_reaches_the_consumer_where_the_item_would_have_been() -> None:
    got: list[int] = []
    with pytest.raises(OSError, match="row group 3 is unreadable"):
        for item in prefetch(counted(10, [], fail_at=3), 2):
            got.append(item)
    assert got == [0, 1, 2]


def test_closing_early_stops_the_producer() -> None:
    before = threading.active_count()
    items = prefetch(counted(10_000, []), 2)
    next(items)
    items.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_reading_ahead_is_for_gpus_unless_set() -> None:
    assert prefetch_depth(None, "cpu") == 0
    assert prefetch_depth(None, "cuda") == 2
    assert prefetch_depth(3, "cpu") == 3 and prefetch_depth(0, "cuda") == 0


def test_the_setting_reaches_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHSCORE_HOME", str(tmp_path))
    monkeypatch.setenv("BATCHSCORE_PREFETCH_ROW_GROUPS", "3")
    params = make_params(RunSettings(), input_path="in", model_uri="m", key_column="k")
    assert params.prefetch_row_groups == 3
    monkeypatch.delenv("BATCHSCORE_PREFETCH_ROW_GROUPS")
    params = make_params(RunSettings(), input_path="in", model_uri="m", key_column="k")
    assert params.prefetch_row_groups is None
