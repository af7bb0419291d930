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


def test_the_producer_runs_at_most_depth_items_ahead() -> None:
    produced: list[int] = []
    items = prefetch(counted(100, produced), 2)
    assert next(items) == 0
    time.sleep(0.2)  # let the producer run as far ahead as it may
    # one taken, two queued, one produced and waiting to be put
    assert len(produced) <= 1 + 2 + 1
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
