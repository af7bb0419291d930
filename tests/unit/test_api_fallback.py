"""The batch fallback: its answers, and the bounds on what it holds in memory."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kv_export.store import PartInfo, VersionInfo
from lookup.fallback import BatchFallback, MemoryBudget, RowGroup, RowGroupId, RowGroupIndex

ROWS, GROUP_ROWS, OUTPUTS = 20_000, 1_000, ["a", "b"]


def version(tmp_path: Path) -> VersionInfo:
    keys = np.arange(ROWS, dtype=np.int64)
    path = tmp_path / "part-0000.parquet"
    table = pa.table(
        {"k": keys, "a": (keys % 97).astype(np.float32), "b": (keys * 2).astype(np.float32)}
    )
    pq.write_table(table, path, row_group_size=GROUP_ROWS)
    return VersionInfo(
        version=1,
        run_id="r1",
        state="complete",
        outputs=OUTPUTS,
        model_name="m",
        model_version="1",
        scored_at="2026-12-06T00:00:00+00:00",
        key_column="k",
        key_type="int",
        parts=[PartInfo(path=str(path), rows=ROWS, min_key=0, max_key=ROWS - 1)],
    )


def test_a_batch_over_every_row_group_is_answered_within_the_memory_bound(
    tmp_path: Path,
) -> None:
    info = version(tmp_path)
    group_bytes = GROUP_ROWS * (8 + 4 * len(OUTPUTS))  # 16 kB decoded
    fallback = BatchFallback(cache_row_groups=1000, memory_bytes=8 * group_bytes)
    wanted = [str(k) for k in range(0, ROWS, 37)] + ["-1", "x", str(ROWS)]

    async def scenario() -> list[list[bytes | None]]:
        return list(
            await asyncio.gather(*(fallback.get_many("ns", info, wanted) for _ in range(5)))
        )

    for answers in asyncio.run(scenario()):
        for key, value in zip(wanted, answers, strict=True):
            if key.isdigit() and int(key) < ROWS:
                k = int(key)
                expected = np.array([k % 97, k * 2], dtype=np.float32).tobytes()
                assert value == expected, key
            else:
                assert value is None, key
    assert fallback._cached_bytes <= 4 * group_bytes  # the cache keeps its half
    assert fallback._decoding.used == 0  # every reservation given back


def test_reservations_never_exceed_the_budget_and_a_large_one_waits_to_be_alone() -> None:
    budget = MemoryBudget(100)
    peak = 0

    async def hold(size: int) -> None:
        nonlocal peak
        async with budget.reserved(size):
            peak = max(peak, budget.used)
            await asyncio.sleep(0.001)

    async def scenario() -> None:
        await asyncio.gather(*(hold(s) for s in [30, 60, 40, 250, 10, 90, 70] * 5))

    asyncio.run(scenario())
    assert peak == 250  # the large one, alone; otherwise at most 100
    assert budget.used == 0


def test_a_caller_that_goes_away_while_waiting_gives_nothing_back_twice() -> None:
    budget = MemoryBudget(100)

    async def scenario() -> None:
        async with budget.reserved(80):
            waiting = asyncio.ensure_future(budget._reserve(50))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert budget.used == 0
        async with budget.reserved(100):
            assert budget.used == 100

    asyncio.run(scenario())


def test_a_row_group_is_decoded_once_however_many_requests_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty requests for keys of one row group, all waiting while it decodes: one decode,
    and every request gets its own key's answer from it."""
    info = version(tmp_path)
    fallback = BatchFallback(cache_row_groups=100)
    decoded: list[RowGroupId] = []
    decode_may_finish = threading.Event()
    real_load = RowGroupIndex.load

    def load_when_allowed(index: RowGroupIndex, group: RowGroupId) -> RowGroup:
        decoded.append(group)
        assert decode_may_finish.wait(30), "the test never let the decode finish"
        return real_load(index, group)

    monkeypatch.setattr(RowGroupIndex, "load", load_when_allowed)
    keys = [str(3 * GROUP_ROWS + i * 37) for i in range(20)]  # all in the fourth row group

    async def scenario() -> list[list[bytes | None]]:
        await fallback.index("ns", info)  # footers read; the requests only decode
        requests = [asyncio.ensure_future(fallback.get_many("ns", info, [key])) for key in keys]
        for _ in range(10):  # every request reaches its wait for the decode
            await asyncio.sleep(0)
        assert not any(r.done() for r in requests)
        decode_may_finish.set()
        return list(await asyncio.gather(*requests))

    answers = asyncio.run(scenario())
    assert decoded == [(info.parts[0].path, 3)]
    for key, (value,) in zip(keys, answers, strict=True):
        k = int(key)
        assert value == np.array([k % 97, k * 2], dtype=np.float32).tobytes()
