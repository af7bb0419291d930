"""Shard planning: pure, deterministic slices of the input by row groups.

A shard is a list of pieces, each a file and a contiguous range of its row
groups. Row groups are packed, in path order, into shards of about
``target_rows`` rows: many small files share a shard, a big file is split
across several, and no row group is ever split. Planning the same input twice
gives the same shards with the same ids, which is what lets a re-run find the
parts that are already done.
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
class Piece:
    path: str
    row_group_start: int
    row_group_end: int  # exclusive
    rows: int

    @property
    def row_groups(self) -> list[int]:
        return list(range(self.row_group_start, self.row_group_end))


@dataclass(frozen=True)
class Shard:
    id: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    @property
    def part_name(self) -> str:
        return f"part-{self.id:05d}.parquet"

    def describe(self) -> str:
        return ", ".join(
            f"{p.path} row groups {p.row_group_start}-{p.row_group_end - 1}" for p in self.pieces
        )


def plan_shards(files: Sequence[InputFile], target_rows: int) -> list[Shard]:
    """Pack row groups, in path order, into shards of at least ``target_rows`` rows.

    A shard closes as soon as it holds ``target_rows`` rows or more, so only
    the last shard may be smaller. Empty files and empty row groups give nothing.
    """
    if target_rows < 1:
        raise ValueError(f"target_rows must be at least 1, got {target_rows}")
    shards: list[Shard] = []
    pieces: list[Piece] = []
    rows = 0
    for file in sorted(files, key=lambda f: f.path):
        for index, group_rows in enumerate(file.row_group_rows):
            if group_rows == 0:
                continue
            pieces = _extend(pieces, file.path, index, group_rows)
            rows += group_rows
            if rows >= target_rows:
                shards.append(Shard(len(shards), tuple(pieces)))
                pieces, rows = [], 0
    if pieces:
        shards.append(Shard(len(shards), tuple(pieces)))
    return shards


def _extend(pieces: list[Piece], path: str, index: int, rows: int) -> list[Piece]:
    """Add one row group, merging it into the last piece when it continues it."""
    last = pieces[-1] if pieces else None
    if last is not None and last.path == path and last.row_group_end == index:
        return [*pieces[:-1], Piece(path, last.row_group_start, index + 1, last.rows + rows)]
    return [*pieces, Piece(path, index, index + 1, rows)]
