"""Answer lookups from a version's batch output (its Parquet parts) when the store is down.

Parts are sorted by key. ``RowGroupIndex`` reads every part's footer once per
version and keeps each row group's key range (from Parquet statistics), so a
lookup touches only the row groups whose range holds the key. Decoded row
groups (sorted keys + a float32 output matrix) are kept in an LRU of
``cache_row_groups`` entries: a hit is a binary search in memory; a miss reads
one row group (two columns' worth of one row group, in a worker thread so the
event loop keeps serving), once however many lookups are waiting for it.

Invariants: the fallback answers from exactly one version's parts (the one the
caller passes), never mixes versions, and answers a key only if the text form
of the stored key equals the requested key (so ``"007"`` does not match ``7``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from kv_export.encoding import VALUE_DTYPE
from kv_export.store import VersionInfo

RowGroupId = tuple[str, int]


@dataclass(frozen=True)
class RowGroup:
    keys: np.ndarray  # sorted
    values: np.ndarray  # (rows, outputs) float32, row i belongs to keys[i]

    def get(self, key: int | str) -> bytes | None:
        i = int(np.searchsorted(self.keys, key))
        if i < len(self.keys) and self.keys[i] == key:
            return self.values[i].tobytes()
        return None


def _holds(low: Any, high: Any, key: int | str) -> bool:
    try:
        return (low is None or low <= key) and (high is None or key <= high)
    except TypeError:  # not comparable: the range cannot exclude the key
        return True


class RowGroupIndex:
    """Key range of every row group of one version's parts, from the footers."""

    def __init__(self, info: VersionInfo) -> None:
        self.info = info
        ranges: list[tuple[Any, Any, str, int]] = []
        for part in info.parts:
            meta = pq.read_metadata(part.path)
            column = meta.schema.to_arrow_schema().get_field_index(info.key_column)
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(column).statistics
                if stats is not None and stats.has_min_max:
                    ranges.append((stats.min, stats.max, part.path, rg))
                else:
                    ranges.append((part.min_key, part.max_key, part.path, rg))
        self.ranges = ranges
        self._search_by_low(ranges)

    def _search_by_low(self, ranges: list[tuple[Any, Any, str, int]]) -> None:
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

    def load(self, group: RowGroupId) -> RowGroup:
        path, rg = group
        columns = [self.info.key_column, *self.info.outputs]
        table = pq.ParquetFile(path).read_row_group(rg, columns=columns)
        keys = table.column(self.info.key_column).to_numpy(zero_copy_only=False)
        values = np.column_stack(
            [table.column(o).to_numpy(zero_copy_only=False) for o in self.info.outputs]
        ).astype(VALUE_DTYPE)
        if len(keys) > 1 and not bool(np.all(keys[:-1] <= keys[1:])):
            order = np.argsort(keys, kind="stable")
            keys, values = keys[order], values[order]
        return RowGroup(keys, np.ascontiguousarray(values))


class BatchFallback:
    """Indexes per version (built once) and the shared LRU of decoded row groups."""

    def __init__(self, cache_row_groups: int, max_versions: int = 32) -> None:
        self._indexes: OrderedDict[tuple[str, int, str], RowGroupIndex] = OrderedDict()
        self._groups: OrderedDict[RowGroupId, RowGroup] = OrderedDict()
        self._loading: dict[RowGroupId, asyncio.Future[dict[RowGroupId, RowGroup]]] = {}
        self._max_groups = cache_row_groups
        self._max_versions = max_versions

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
        index = await self.index(namespace, info)
        typed = [index.typed(k) for k in keys]
        wanted = {k: index.row_groups_for(k) for k in typed if k is not None}
        groups = {g: self._groups.get(g) for gs in wanted.values() for g in gs}
        missing = [g for g, data in groups.items() if data is None]
        for group in groups.keys() - set(missing):
            self._groups.move_to_end(group)
        if missing:
            groups.update(await self._load(index, missing))
        return [
            self._find(k, [groups[g] for g in wanted[k]]) if k is not None else None for k in typed
        ]

    async def _load(
        self, index: RowGroupIndex, wanted: list[RowGroupId]
    ) -> dict[RowGroupId, RowGroup]:
        """Decode row groups in a worker thread, each once: lookups that need a row group
        already being decoded (the first seconds of an outage) wait for that decode."""
        new = [g for g in wanted if g not in self._loading]
        if new:
            decode = asyncio.ensure_future(
                asyncio.to_thread(lambda: {g: index.load(g) for g in new})
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

    @staticmethod
    def _find(key: int | str, groups: list[RowGroup | None]) -> bytes | None:
        for data in groups:
            value = data.get(key) if data is not None else None
            if value is not None:
                return value
        return None

    def _remember(self, group: RowGroupId, data: RowGroup) -> None:
        self._groups[group] = data
        while len(self._groups) > self._max_groups:
            self._groups.popitem(last=False)
