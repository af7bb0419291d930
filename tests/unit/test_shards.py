from __future__ import annotations

import pytest

from scoring.shards import InputFile, plan_shards


def files() -> list[InputFile]:
    return [
        InputFile("/d/b.parquet", (100, 100, 100, 100, 50)),
        InputFile("/d/a.parquet", (300, 300)),
        InputFile("/d/empty.parquet", ()),
    ]


def test_plan_is_deterministic_and_ordered_by_path() -> None:
    first = plan_shards(files(), 200)
    assert first == plan_shards(list(reversed(files())), 200)
    assert [s.path for s in first] == ["/d/a.parquet"] * 2 + ["/d/b.parquet"] * 3
    assert [s.id for s in first] == list(range(5))


def test_row_groups_are_packed_to_the_target_and_never_split() -> None:
    shards = plan_shards(files(), 200)
    b = [(s.row_group_start, s.row_group_end, s.rows) for s in shards if s.path.endswith("b.parquet")]
    assert b == [(0, 2, 200), (2, 4, 200), (4, 5, 50)]
    a = [(s.row_group_start, s.row_group_end) for s in shards if s.path.endswith("a.parquet")]
    assert a == [(0, 1), (1, 2)]


def test_every_row_is_in_exactly_one_shard() -> None:
    shards = plan_shards(files(), 170)
    assert sum(s.rows for s in shards) == sum(f.rows for f in files())
    for f in files():
        covered = [g for s in shards if s.path == f.path for g in s.row_groups]
        assert covered == list(range(len(f.row_group_rows)))


def test_part_names_follow_shard_ids() -> None:
    assert plan_shards(files(), 10_000)[1].part_name == "part-00001.parquet"


def test_target_must_be_positive() -> None:
    with pytest.raises(ValueError, match="target_rows"):
        plan_shards(files(), 0)
