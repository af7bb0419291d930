from __future__ import annotations

import pytest

from scoring.shards import InputFile, Piece, plan_shards


def files() -> list[InputFile]:
    return [
        InputFile("/d/b.parquet", (100, 100, 100, 100, 50)),
        InputFile("/d/a.parquet", (300, 300)),
        InputFile("/d/empty.parquet", ()),
    ]


def test_plan_is_deterministic_and_ordered_by_path() -> None:
    first = plan_shards(files(), 200)
    assert first == plan_shards(list(reversed(files())), 200)
    assert [s.id for s in first] == list(range(len(first)))
    assert first[0].pieces[0].path == "/d/a.parquet"


def test_big_files_are_split_and_row_groups_packed_to_the_target() -> None:
    shards = plan_shards(files(), 200)
    assert [s.rows for s in shards] == [300, 300, 200, 200, 50]
    assert shards[2].pieces == (Piece("/d/b.parquet", 0, 2, 200),)


def test_small_files_share_a_shard() -> None:
    small = [InputFile(f"/d/{i:02d}.parquet", (10,)) for i in range(10)]
    shards = plan_shards(small, 35)
    assert [s.rows for s in shards] == [40, 40, 20]
    assert [p.path for p in shards[0].pieces] == [f"/d/{i:02d}.parquet" for i in range(4)]


def test_every_row_group_is_in_exactly_one_shard() -> None:
    shards = plan_shards(files(), 170)
    assert sum(s.rows for s in shards) == sum(f.rows for f in files())
    for f in files():
        covered = [g for s in shards for p in s.pieces if p.path == f.path for g in p.row_groups]
        assert covered == list(range(len(f.row_group_rows)))


def test_part_names_follow_shard_ids() -> None:
    assert plan_shards(files(), 10_000)[0].part_name == "part-00000.parquet"
    assert len(plan_shards(files(), 10_000)) == 1


def test_target_must_be_positive() -> None:
    with pytest.raises(ValueError, match="target_rows"):
        plan_shards(files(), 0)
