"""Answer lookups from a version's batch output (its Parquet parts) when the store is down.

Parts are sorted by key and their key ranges are in the version record, so a
lookup opens only the parts whose range holds the key, and Parquet's row-group
statistics let the reader skip every row group but the one that can hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from kv_export.encoding import pack_values
from kv_export.store import VersionInfo


class BatchOutput:
    def __init__(self, info: VersionInfo) -> None:
        self.info = info

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        typed = [self._typed(k) for k in keys]
        wanted = {k for k in typed if k is not None}
        if not wanted:
            return [None] * len(keys)
        paths = [p.path for p in self.info.parts if any(self._covers(p, k) for k in wanted)]
        found: dict[Any, bytes] = {}
        if paths:
            column = self.info.key_column
            table = ds.dataset(paths, format="parquet").to_table(
                columns=[column, *self.info.outputs],
                filter=ds.field(column).isin(pa.array(sorted(wanted, key=str))),
            )
            if table.num_rows:
                matrix = np.column_stack(
                    [table.column(o).to_numpy(zero_copy_only=False) for o in self.info.outputs]
                )
                found = dict(zip(table.column(column).to_pylist(), pack_values(matrix), strict=True))
        return [found.get(k) if k is not None else None for k in typed]

    def _typed(self, key: str) -> int | str | None:
        if self.info.key_type == "string":
            return key
        try:
            return int(key)
        except ValueError:
            return None

    @staticmethod
    def _covers(part: Any, key: int | str) -> bool:
        if part.min_key is None or part.max_key is None:
            return True
        try:
            return bool(part.min_key <= key <= part.max_key)
        except TypeError:
            return True
