"""How output parts are encoded (``scoring.engine.part_options``): no dictionaries,
integer keys as deltas, statistics kept; and every reader of parts reads them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring.engine import PART_ROW_GROUP_ROWS, write_part


def part_table(keys: pa.Array) -> pa.Table:
    rows = len(keys)
    return pa.table(
        {"id": keys, "score": np.linspace(0, 1, rows, dtype=np.float32)},
        metadata={"batchscore.shard": "0"},
    )


@pytest.mark.parametrize(
    "keys",
    [
        pa.array(np.arange(100_000, dtype=np.int64) * 7 - 3),
        pa.array(np.arange(50_000, dtype=np.int32)),
        pa.array([f"user-{i:06d}" for i in range(40_000)]),
    ],
    ids=["int64", "int32", "string"],
)
def test_a_part_reads_back_as_written_with_its_key_range_in_the_statistics(
    tmp_path: Path, keys: pa.Array
) -> None:
    table = part_table(keys)
    part = tmp_path / "part-00000.parquet"
    write_part(table, part, "id")
    assert pq.read_table(part).equals(table)
    meta = pq.ParquetFile(part).metadata
    assert meta.row_group(0).num_rows == min(len(keys), PART_ROW_GROUP_ROWS)
    first, last = meta.row_group(0).column(0), meta.row_group(meta.num_row_groups - 1).column(0)
    assert first.statistics.min == keys[0].as_py()
    assert last.statistics.max == keys[-1].as_py()
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            encodings = meta.row_group(group).column(column).encodings
            assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(encodings)
    if pa.types.is_integer(keys.type):
        assert "DELTA_BINARY_PACKED" in first.encodings
    assert not list(tmp_path.glob(".*"))  # no temporary left beside the part
