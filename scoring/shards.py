"""Shard planning: pure, deterministic slices of the input by file and row groups.

A shard is a file and a contiguous range of its row groups. Planning the same
input twice gives the same shards with the same ids, which is what lets a
re-run find the parts that are already done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InputFile:
    path: str
    row_group_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class Shard:
    id: int
    path: str
    row_group_start: int
    row_group_end: int  # exclusive
    rows: int

    @property
    def part_name(self) -> str:
        return f"part-{self.id:05d}.parquet"

    @property
    def row_groups(self) -> list[int]:
        return list(range(self.row_group_start, self.row_group_end))


def plan_shards(files: Sequence[InputFile], target_rows: int) -> list[Shard]:
    """Pack consecutive row groups of each file into shards of about ``target_rows``.

    Files are taken in path order; a shard closes once it holds at least
    ``target_rows`` rows, so no shard is smaller than its smallest row group
    allows and none spans two files. Empty files give no shard.
    """
    if target_rows < 1:
        raise ValueError(f"target_rows must be at least 1, got {target_rows}")
    shards: list[Shard] = []
    for file in sorted(files, key=lambda f: f.path):
        start, rows = 0, 0
        for index, group_rows in enumerate(file.row_group_rows):
            rows += group_rows
            if rows >= target_rows:
                shards.append(Shard(len(shards), file.path, start, index + 1, rows))
                start, rows = index + 1, 0
        if rows > 0:
            shards.append(Shard(len(shards), file.path, start, len(file.row_group_rows), rows))
    return shards
