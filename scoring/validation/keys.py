"""The key's uniqueness across all parts, with memory bounded by parts × row group.

Parts are sorted by key: two parts whose key ranges do not overlap cannot share a key,
so a part alone in its range answers with its own per-part uniqueness result, and only
parts whose ranges overlap are merged in key order, a row group at a time
(``duplicate_keys``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from batchscore.core import storage
from scoring.validation.arrow_checks import PARTIAL, UNIQUE
from scoring.validation.documents import JsonScalar, plain
from scoring.validation.suite import Key, PartReport


@dataclass(frozen=True)
class KeyDuplicates:
    rows: int  # rows whose key occurs more than once, over all parts
    sample: list[JsonScalar]  # some of the repeated keys
    parts: dict[str, int]  # part name → its rows with a duplicated key
    parts_merged: int  # parts whose keys were read (their key range overlaps another's)


def duplicate_keys(reports: Sequence[PartReport], key: str, limit: int = PARTIAL) -> KeyDuplicates:
    """Keys occurring more than once across all parts, in memory bounded by row groups.

    A part whose key range overlaps no other part's can only repeat its own keys, which
    its per-part uniqueness result counts. Parts with overlapping ranges are merged.
    """
    rows, merged = 0, 0
    sample: list[JsonScalar] = []
    parts: dict[str, int] = {}
    for group in overlapping_groups(reports):
        if len(group) == 1:
            found = _own_duplicates(group[0], key)
        else:
            found = _merge_duplicates([r.part for r in group], key, limit)
            merged += len(group)
        rows += found.rows
        sample += found.sample[: max(limit - len(sample), 0)]
        parts |= found.parts
    return KeyDuplicates(rows, sample, parts, merged)


def overlapping_groups(reports: Sequence[PartReport]) -> list[list[PartReport]]:
    """Parts grouped so that key ranges of different groups are disjoint (empty parts: none)."""
    ranged = sorted((r for r in reports if r.rows and r.min_key is not None), key=_min_key)
    groups: list[list[PartReport]] = []
    high: Key | None = None
    for report in ranged:
        # one key column: every key has its type, int or str
        if groups and report.min_key <= high:  # type: ignore[operator]
            groups[-1].append(report)
            high = max(high, report.max_key)  # type: ignore[type-var]
        else:
            groups.append([report])
            high = report.max_key
    return groups


def _min_key(report: PartReport) -> Key:
    assert report.min_key is not None  # parts without keys are left out before
    return report.min_key


def _own_duplicates(report: PartReport, key: str) -> KeyDuplicates:
    for document in report.results:
        config = document["expectation_config"]
        if config["type"] == UNIQUE and config["kwargs"].get("column") == key:
            result = document.get("result") or {}
            count = int(result.get("unexpected_count") or 0)
            sample = sorted(set(result.get("partial_unexpected_list") or []))
            return KeyDuplicates(count, sample, {report.name: count} if count else {}, 0)
    return _merge_duplicates([report.part], key, PARTIAL)


class _KeyCursor:
    """The sorted keys of one part, read a row group at a time."""

    def __init__(self, path: str, key: str) -> None:
        self.file = storage.open_parquet(path, buffer_size=0)  # a file, or an object's
        self.name = storage.name_of(path)
        self.key = key
        self.next_group = 0
        self.buffer: np.ndarray = np.empty(0)

    @property
    def exhausted(self) -> bool:
        return self.next_group >= self.file.num_row_groups

    def load(self) -> None:
        column = self.file.read_row_group(self.next_group, columns=[self.key]).column(0)
        self.next_group += 1
        keys = pc.drop_null(column).to_numpy()
        self.buffer = np.concatenate([self.buffer, keys]) if len(self.buffer) else keys

    def take(self, count: int) -> np.ndarray:
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken


def _merge_duplicates(paths: Sequence[str], key: str, limit: int) -> KeyDuplicates:
    """k-way merge of sorted parts in windows: every key value falls into exactly one window.

    A window takes, from every part, the keys below the smallest last-loaded key of the
    parts not yet read to the end; nothing below it is left unread, so equal keys are
    never split between windows.
    """
    cursors = [_KeyCursor(p, key) for p in paths]
    rows = 0
    sample: list[JsonScalar] = []
    parts: Counter[str] = Counter()
    while True:
        for cursor in cursors:
            while not len(cursor.buffer) and not cursor.exhausted:
                cursor.load()
        live = [c for c in cursors if len(c.buffer)]
        if not live:
            break
        unread = [c for c in live if not c.exhausted]
        if unread:
            bound = min(c.buffer[-1] for c in unread)
            cuts = [int(np.searchsorted(c.buffer, bound, "left")) for c in live]
            if not any(cuts):  # every buffer starts at the bound: read further where it ends
                for cursor in unread:
                    if cursor.buffer[-1] == bound:
                        cursor.load()
                continue
        else:
            cuts = [len(c.buffer) for c in live]
        window = [c.take(n) for c, n in zip(live, cuts, strict=True)]
        found = _window_duplicates(window, [c.name for c in live])
        rows += found.rows
        sample += found.sample[: max(limit - len(sample), 0)]
        parts.update(found.parts)
    return KeyDuplicates(rows, sample, dict(parts), len(paths))


def _window_duplicates(window: list[np.ndarray], names: list[str]) -> KeyDuplicates:
    keys = np.sort(np.concatenate(window), kind="stable")  # sorted runs: merged, not sorted
    if not (keys[1:] == keys[:-1]).any():
        return KeyDuplicates(0, [], {}, 0)
    keys = np.concatenate(window)  # rare: find which parts hold the repeated keys
    owners = np.repeat(np.arange(len(window)), [len(w) for w in window])
    order = np.argsort(keys, kind="stable")
    keys, owners = keys[order], owners[order]
    same = keys[1:] == keys[:-1]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    counts = np.bincount(owners[repeated], minlength=len(names))
    parts = {names[i]: int(n) for i, n in enumerate(counts) if n}
    sample = [plain(v) for v in np.unique(keys[repeated])[:PARTIAL]]
    return KeyDuplicates(int(repeated.sum()), sample, parts, 0)
