"""Answer lookups from a version's batch output (its Parquet parts) when the store is down.

Parts are sorted by key. ``RowGroupIndex`` reads every part's footer once per
version and keeps each row group's key range (from Parquet statistics), so a
lookup touches only the row groups whose range holds the key. Decoded row
groups (sorted keys + a float32 output matrix) are kept in an LRU of
``cache_row_groups`` entries: a hit is a binary search in memory; a miss reads
one row group (two columns' worth of one row group, in a worker thread so the
event loop keeps serving), once however many lookups are waiting for it.

Parts are local files or objects of a store (a run folder at ``s3://...``): their footers
and row groups are read through ``batchscore.core.storage``, ranged reads on a store, with
the credentials and endpoint of the API's environment (``AWS_*``).

Invariants: the fallback answers from exactly one version's parts (the one the
caller passes), never mixes versions, and answers a key only if the text form
of the stored key equals the requested key (so ``"007"`` does not match ``7``).

Memory is bounded by ``memory_bytes`` (``BATCHSCORE_FALLBACK_MEMORY_BYTES``), all
requests together, in decoded bytes as estimated from the footers (rows × (key +
outputs)): the cache holds at most half of it; decodes in flight hold reservations
on the other half (``MemoryBudget``), taken before a decode and kept until the
request has answered from those row groups. A request decodes at most an eighth
at a time, so a 1,000-key batch that touches every row group of a large version
goes through them a slice at a time instead of holding them all. A row group larger
than a slice is decoded alone, and one larger than the whole reservation half
waits until it is the only decode.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchscore.core import storage
from kv_export.encoding import VALUE_DTYPE
from kv_export.store import VersionInfo

RowGroupId = tuple[str, int]
# A bound of a row group's key range: an int or a str, as the key column's statistics (or
# the part's manifest) hold it, or None where unknown. Compared with keys as they come,
# with ``TypeError`` caught where the types differ, which no precise type can express.
KeyBound = Any
KeyRange = tuple[KeyBound, KeyBound, str, int]  # low, high, part path, row group


DECODE_THREADS = 2
STRING_KEY_BYTES = 72  # a short str object and its pointer in a numpy object array
INT_KEY_BYTES = 8


class MemoryBudget:
    """Bytes reserved and released, at most ``total`` at once; a reservation waits (first
    come, first served) until it fits, and one larger than ``total`` fits when it is
    alone. A request holds one reservation at a time, so none waits on another's."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def reserved(self, size: int) -> AsyncIterator[None]:
        await self._reserve(size)
        try:
            yield
        finally:
            self._release(size)

    async def _reserve(self, size: int) -> None:
        if not self._waiting and self._fits(size):
            self.used += size
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((size, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(size)  # granted as the caller went away: give it back
            else:
                self._waiting.remove((size, turn))
                self._grant()
            raise

    def _release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _fits(self, size: int) -> bool:
        return self.used + size <= self.total or self.used == 0

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, turn = self._waiting.popleft()
            self.used += size
            turn.set_result(None)


@dataclass(frozen=True)
class RowGroup:
    keys: np.ndarray  # sorted
    values: np.ndarray  # (rows, outputs) float32, row i belongs to keys[i]
    size: int  # decoded bytes as estimated before decoding (what the budget counted)

    def get(self, key: int | str) -> bytes | None:
        i = int(np.searchsorted(self.keys, key))
        if i < len(self.keys) and self.keys[i] == key:
            return self.values[i].tobytes()
        return None


def _holds(low: KeyBound, high: KeyBound, key: int | str) -> bool:
    try:
        return (low is None or low <= key) and (high is None or key <= high)
    except TypeError:  # not comparable: the range cannot exclude the key
        return True


class RowGroupIndex:
    """Key range of every row group of one version's parts, from the footers."""

    def __init__(self, info: VersionInfo) -> None:
        self.info = info
        ranges: list[KeyRange] = []
        self.rows: dict[RowGroupId, int] = {}
        for part in info.parts:
            meta = storage.read_metadata(part.path)
            column = meta.schema.to_arrow_schema().get_field_index(info.key_column)
            for rg in range(meta.num_row_groups):
                self.rows[(part.path, rg)] = meta.row_group(rg).num_rows
                stats = meta.row_group(rg).column(column).statistics
                if stats is not None and stats.has_min_max:
                    ranges.append((stats.min, stats.max, part.path, rg))
                else:
                    ranges.append((part.min_key, part.max_key, part.path, rg))
        self.ranges = ranges
        self._search_by_low(ranges)

    def _search_by_low(self, ranges: list[KeyRange]) -> None:
        """Sort the bounded ranges by their low key and keep the running maximum of their
        high keys, so that a lookup bisects instead of testing every row group (thousands
        for a large version). Ranges open at one end (no statistics) are tested one by one."""
        bounded = [r for r in ranges if r[0] is not None and r[1] is not None]
        self._open = [r for r in ranges if r[0] is None or r[1] is None]
        try:
            bounded.sort(key=lambda r: r[0])
            self._reach = list(itertools.accumulate((r[1] for r in bounded), max))
        except TypeError:  # keys of mixed types in the statistics: test every row group
            bounded, self._reach = [], []
            self._open = ranges
        self._bounded = bounded
        self._lows = [r[0] for r in bounded]

    def typed(self, key: str) -> int | str | None:
        if self.info.key_type == "string":
            return key
        try:
            number = int(key)
        except ValueError:
            return None
        return number if str(number) == key else None

    def row_groups_for(self, key: int | str) -> list[RowGroupId]:
        """Every row group whose key range holds ``key``: the ranges starting at or before
        it, walked back only while the running maximum of their ends still reaches it."""
        found = [(path, rg) for low, high, path, rg in self._open if _holds(low, high, key)]
        try:
            i = bisect.bisect_right(self._lows, key)
            while i > 0 and self._reach[i - 1] >= key:
                i -= 1
                _, high, path, rg = self._bounded[i]
                if key <= high:
                    found.append((path, rg))
        except TypeError:  # a key of another type than the statistics: no range excludes it
            return [(path, rg) for _, _, path, rg in self.ranges]
        return found

    def size(self, group: RowGroupId) -> int:
        """The row group's decoded size, estimated from its row count: keys and outputs."""
        key = STRING_KEY_BYTES if self.info.key_type == "string" else INT_KEY_BYTES
        return self.rows.get(group, 0) * (key + VALUE_DTYPE.itemsize * len(self.info.outputs))

    def load(self, group: RowGroupId) -> RowGroup:
        """Decode one row group's keys and outputs, a column at a time into one float32
        matrix, so that what is held at once stays near the decoded size (``size``)."""
        path, rg = group
        file = storage.open_parquet(path, buffer_size=0)

        def column(name: str) -> np.ndarray:
            table = file.read_row_group(rg, columns=[name], use_threads=False)
            return table.column(0).to_numpy(zero_copy_only=False)  # type: ignore[no-any-return]

        keys = column(self.info.key_column)
        values = np.empty((len(keys), len(self.info.outputs)), dtype=VALUE_DTYPE)
        for j, name in enumerate(self.info.outputs):
            values[:, j] = column(name)
        if len(keys) > 1 and not bool(np.all(keys[:-1] <= keys[1:])):
            order = np.argsort(keys, kind="stable")
            keys, values = keys[order], values[order]
        return RowGroup(keys, values, self.size(group))


class BatchFallback:
    """Indexes per version (built once) and the shared LRU of decoded row groups."""

    def __init__(
        self, cache_row_groups: int, memory_bytes: int = 256 << 20, max_versions: int = 32
    ) -> None:
        self._indexes: OrderedDict[tuple[str, int, str], RowGroupIndex] = OrderedDict()
        self._groups: OrderedDict[RowGroupId, RowGroup] = OrderedDict()
        self._loading: dict[RowGroupId, asyncio.Future[dict[RowGroupId, RowGroup]]] = {}
        self._max_groups = cache_row_groups
        self._max_versions = max_versions
        self._cache_bytes = memory_bytes // 2
        self._cached_bytes = 0
        self._decoding = MemoryBudget(memory_bytes - self._cache_bytes)
        self._slice_bytes = max(1, memory_bytes // 8)
        # Decodes run in threads of their own, few: each thread that decodes keeps a heap
        # of Arrow's allocator, and the event loop's default pool has many threads.
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fallback")

    def available(self, info: VersionInfo) -> bool:
        return bool(info.parts)

    async def index(self, namespace: str, info: VersionInfo) -> RowGroupIndex:
        """The version's index; built in a thread the first time (footers only)."""
        name = (namespace, info.version, info.run_id)
        index = self._indexes.get(name)
        if index is None:
            index = await asyncio.to_thread(RowGroupIndex, info)
            self._indexes[name] = index
            while len(self._indexes) > self._max_versions:
                self._indexes.popitem(last=False)
        return index

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[str]
    ) -> list[bytes | None]:
        """Answers from cached row groups first, then from the others a slice at a time,
        each slice's decoded row groups dropped (or left to the cache) before the next."""
        index = await self.index(namespace, info)
        typed = [index.typed(k) for k in keys]
        needed: dict[RowGroupId, list[int]] = {}
        for i, key in enumerate(typed):
            if key is not None:
                for group in index.row_groups_for(key):
                    needed.setdefault(group, []).append(i)
        found: list[bytes | None] = [None] * len(keys)
        missing = []
        for group, positions in needed.items():
            data = self._groups.get(group)
            if data is None:
                missing.append(group)
                continue
            self._groups.move_to_end(group)
            _answer(data, positions, typed, found)
        for part in self._slices(index, missing):
            async with self._decoding.reserved(sum(index.size(g) for g in part)):
                loaded = await self._load(index, part)
                for group in part:
                    _answer(loaded[group], needed[group], typed, found)
                del loaded
        return found

    def _slices(self, index: RowGroupIndex, groups: list[RowGroupId]) -> Iterator[list[RowGroupId]]:
        """Consecutive runs of ``groups`` of at most a slice's bytes (at least one each)."""
        part: list[RowGroupId] = []
        size = 0
        for group in groups:
            if part and size + index.size(group) > self._slice_bytes:
                yield part
                part, size = [], 0
            part.append(group)
            size += index.size(group)
        if part:
            yield part

    async def _load(
        self, index: RowGroupIndex, wanted: list[RowGroupId]
    ) -> dict[RowGroupId, RowGroup]:
        """Decode row groups in a worker thread, each once: lookups that need a row group
        already being decoded (the first seconds of an outage) wait for that decode."""
        new = [g for g in wanted if g not in self._loading]
        if new:
            decode = asyncio.get_running_loop().run_in_executor(
                self._decoder, lambda: {g: index.load(g) for g in new}
            )
            for group in new:
                self._loading[group] = decode
            decode.add_done_callback(lambda done: self._loaded(new, done))
        found: dict[RowGroupId, RowGroup] = {}
        for pending in {id(self._loading[g]): self._loading[g] for g in wanted}.values():
            found.update(await asyncio.shield(pending))  # a caller going away cancels no decode
        return {g: found[g] for g in wanted}

    def _loaded(
        self, groups: list[RowGroupId], task: asyncio.Future[dict[RowGroupId, RowGroup]]
    ) -> None:
        for group in groups:
            self._loading.pop(group, None)
        if not task.cancelled() and task.exception() is None:
            for group, data in task.result().items():
                self._remember(group, data)

    def _remember(self, group: RowGroupId, data: RowGroup) -> None:
        """Cache a decoded row group within both bounds, least recently used out first; one
        larger than the cache's bytes is not kept."""
        if group in self._groups or data.size > self._cache_bytes:
            return
        self._groups[group] = data
        self._cached_bytes += data.size
        while len(self._groups) > self._max_groups or self._cached_bytes > self._cache_bytes:
            _, dropped = self._groups.popitem(last=False)
            self._cached_bytes -= dropped.size


def _answer(
    data: RowGroup, positions: list[int], typed: list[int | str | None], found: list[bytes | None]
) -> None:
    """Fill ``found`` at ``positions`` from one row group (a key found earlier is kept)."""
    for i in positions:
        key = typed[i]
        if found[i] is None and key is not None:
            found[i] = data.get(key)
