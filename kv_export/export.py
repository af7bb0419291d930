"""Bulk-load a run's output parts into a store as one (still invisible) version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from kv_export.encoding import encode_keys, pack_values
from kv_export.store import NewVersion, PredictionStore, VersionInfo

BATCH_ROWS = 50_000


@dataclass(frozen=True)
class ExportResult:
    info: VersionInfo
    keys: int
    reused: bool  # the run's version was already complete (a retried export)


def export_parts(
    store: PredictionStore, namespace: str, new: NewVersion, parts: Sequence[Path]
) -> ExportResult:
    """Load every part into the run's version and mark it complete.

    A retry of the same run finds the run's version: a complete one is reused
    as it is, a half-loaded one is loaded again over itself (same keys, same
    values), so an export can be retried any number of times.
    """
    info = store.begin_version(namespace, new)
    if info.state == "complete":
        return ExportResult(info=info, keys=info.key_count, reused=True)
    total = 0
    columns = [new.key_column, *new.outputs]
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            keys = encode_keys(batch.column(new.key_column).to_pylist())
            matrix = np.column_stack(
                [batch.column(name).to_numpy(zero_copy_only=False) for name in new.outputs]
            )
            store.write(namespace, info, keys, pack_values(matrix))
            total += len(keys)
    done = store.complete_version(namespace, info.version, total)
    return ExportResult(info=done, keys=total, reused=False)
