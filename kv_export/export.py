"""Bulk-load a run's output parts into a store as one (still invisible) version.

Rows are read from the parts in Arrow batches, turned into text keys and a
float32 matrix without a Python call per row, gathered into writes of about
``FLUSH_ROWS`` rows (so a Redis bucket receives many fields per HSET), and
written by ``store.parallel_writers`` threads at once (each Redis writer uses
its own connection), or, for LMDB, all in one write transaction. With a Dask
client, each worker loads the parts it is given straight into the store
(``export_parts_on_dask``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kv_export.connect import StoreTarget
from kv_export.encoding import VALUE_DTYPE, text_keys
from kv_export.errors import VersionNotFound
from kv_export.interface import PredictionStore
from kv_export.state import NewVersion, VersionInfo

if TYPE_CHECKING:  # Dask is imported by the caller that has a cluster, never here
    from distributed import Client

BATCH_ROWS = 262_144
FLUSH_ROWS = 2_000_000


@dataclass(frozen=True)
class ExportResult:
    info: VersionInfo
    keys: int
    reused: bool  # the run's version was already complete (a retried export)
    loaded_on: tuple[str, ...] = ()  # the Dask workers that loaded parts; none: this process


def export_parts(
    store: PredictionStore,
    namespace: str,
    new: NewVersion,
    parts: Sequence[Path | str],
    *,
    flush_rows: int = FLUSH_ROWS,
    writers: int | None = None,
) -> ExportResult:
    """Load every part into the run's version and mark it complete.

    A retry of the same run finds the run's version: a complete one is reused
    as it is, a half-loaded one is loaded again over itself (same keys, same
    values), so an export can be retried any number of times. Nothing of the
    version is visible to readers before ``publish``.
    """
    info = store.begin_version(namespace, new)
    if info.state == "complete":
        return ExportResult(info=info, keys=info.key_count, reused=True)
    total = load_parts(store, namespace, info, parts, flush_rows=flush_rows, writers=writers)
    return _complete(store, namespace, info, total)


def load_parts(
    store: PredictionStore,
    namespace: str,
    info: VersionInfo,
    parts: Sequence[Path | str],
    *,
    flush_rows: int = FLUSH_ROWS,
    writers: int | None = None,
) -> int:
    """Write the rows of ``parts`` into ``info``'s version; return the number of rows.

    A store that loads a version in one transaction (``write_all``: LMDB) is given every
    flush in this thread; the others get each flush as a write of its own, from
    ``parallel_writers`` threads."""
    columns = [info.key_column, *info.outputs]
    write_all = getattr(store, "write_all", None)
    if write_all is not None:
        return int(write_all(namespace, info, _flushes(parts, columns, info.outputs, flush_rows)))
    threads = max(1, writers or getattr(store, "parallel_writers", 1))
    total = 0
    pending: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for keys, values in _flushes(parts, columns, info.outputs, flush_rows):
            while len(pending) > threads:  # bounded: at most threads + 1 flushes in memory
                pending.pop(0).result()
            pending.append(pool.submit(store.write_columns, namespace, info, keys, values))
            total += len(keys)
        for future in pending:
            future.result()
    return total


def _flushes(
    parts: Sequence[Path | str], columns: list[str], outputs: list[str], flush_rows: int
) -> Iterator[tuple[pa.BinaryArray, np.ndarray]]:
    """(text keys, float32 matrix) of about ``flush_rows`` rows at a time, across parts."""
    keys: list[pa.Array] = []
    values: list[np.ndarray] = []
    held = 0
    for part in parts:
        reader = pq.ParquetFile(part)
        for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            keys.append(text_keys(batch.column(columns[0])))
            values.append(
                np.column_stack(
                    [batch.column(name).to_numpy(zero_copy_only=False) for name in outputs]
                ).astype(VALUE_DTYPE, copy=False)
            )
            held += batch.num_rows
            if held >= flush_rows:
                yield pa.concat_arrays(keys), np.concatenate(values)
                keys, values, held = [], [], 0
    if held:
        yield pa.concat_arrays(keys), np.concatenate(values)


def _complete(
    store: PredictionStore, namespace: str, info: VersionInfo, total: int
) -> ExportResult:
    try:
        done = store.complete_version(namespace, info.version, total)
    except VersionNotFound as exc:
        # `gc` dropped this version while it loaded: remove what this load wrote.
        store.delete_version_data(namespace, info)
        raise VersionNotFound(
            f"Version {info.version} of namespace '{namespace}' was deleted while it loaded",
            expected="no `batchscore gc` of a version that is still loading",
            found=str(exc),
            fix="Run the export again: the run gets a new version",
        ) from exc
    return ExportResult(info=done, keys=total, reused=False)


def export_parts_on_dask(
    client: Client,
    target: StoreTarget,
    namespace: str,
    new: NewVersion,
    parts: Sequence[Path | str],
    *,
    flush_rows: int = FLUSH_ROWS,
) -> ExportResult:
    """``export_parts`` where each Dask worker loads its parts straight into the store.

    The driver only begins and completes the version (two small state
    updates); the rows never pass through it. Workers must reach the store
    ``target`` names and read the parts at the same paths (shared storage).
    """
    store = target.open()
    try:
        info = store.begin_version(namespace, new)
        if info.state == "complete":
            return ExportResult(info=info, keys=info.key_count, reused=True)
        futures = client.map(
            _load_on_worker,
            [str(p) for p in parts],
            target=target,
            namespace=namespace,
            info=info,
            flush_rows=flush_rows,
            pure=False,
        )
        loaded = client.gather(futures)
        done = _complete(store, namespace, info, sum(rows for rows, _ in loaded))
        return replace(done, loaded_on=tuple(sorted({worker for _, worker in loaded})))
    finally:
        store.close()


def _load_on_worker(
    part: str, *, target: StoreTarget, namespace: str, info: VersionInfo, flush_rows: int
) -> tuple[int, str]:
    """Load one part on this worker: the rows loaded, and the worker's name."""
    from distributed import get_worker

    store = target.open()
    try:
        rows = load_parts(store, namespace, info, [part], flush_rows=flush_rows)
    finally:
        store.close()
    return rows, str(get_worker().name)
