"""Score shards on a Dask cluster: the model is loaded once per worker process.

The driver downloads the model once per run; a ``WorkerPlugin`` carries only its
local path to each worker, where the model is loaded on first use and kept for
the worker's life, outside the task graph. Each shard's output part is written
under a temporary name and renamed into place: a part that exists is complete,
so a re-run skips it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from scoring.errors import ShardFailed
from scoring.model import ModelSpec, Predictor
from scoring.shards import Shard

PLUGIN_NAME = "batchscore-model"
PART_ROW_GROUP_ROWS = 32_768
log = logging.getLogger(__name__)

_model_loads = 0  # per process: how many times this process loaded a model


@dataclass(frozen=True)
class ScoreJob:
    run_id: str
    model_dir: str
    model_name: str
    model_version: str
    spec: ModelSpec
    key_column: str
    parts_dir: str
    batch_size: int
    force: bool = False


@dataclass(frozen=True)
class ShardResult:
    shard_id: int
    part: str
    rows: int
    outputs: tuple[str, ...]
    min_key: int | str | None
    max_key: int | str | None
    seconds: float
    skipped: bool
    worker: str
    model_loads: int


class ModelPlugin(WorkerPlugin):
    """Holds one loaded model per worker process."""

    def __init__(self, model_dir: str, spec: ModelSpec, threads: int) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.threads = threads
        self._predictor: Predictor | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"model_dir": self.model_dir, "spec": self.spec, "threads": self.threads}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._predictor = None
        self._lock = threading.Lock()

    def setup(self, worker: object) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def predictor(self) -> Predictor:
        global _model_loads
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(Path(self.model_dir), self.spec)
                _model_loads += 1
            return self._predictor


def score_shard(shard: Shard, job: ScoreJob) -> ShardResult:
    """Score one shard into its part; skip it when the part already exists."""
    started = time.perf_counter()
    part = Path(job.parts_dir) / shard.part_name
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if part.exists() and not job.force:
        return existing_result(shard, part, job, worker, started)
    plugin = get_worker().plugins[PLUGIN_NAME]
    assert isinstance(plugin, ModelPlugin)
    columns = [job.key_column, *job.spec.features]
    table = pq.ParquetFile(shard.path).read_row_groups(shard.row_groups, columns=columns)
    predictions = plugin.predictor().predict(table, job.batch_size)
    if len(predictions) != table.num_rows:
        raise ShardFailed(
            f"Model returned {len(predictions)} predictions for {table.num_rows} rows of "
            f"{shard.path} (row groups {shard.row_group_start}-{shard.row_group_end - 1})",
            expected="one prediction per input row",
        )
    names = job.spec.output_names(predictions.shape[1])
    output = pa.table(
        {job.key_column: table.column(job.key_column)}
        | {name: predictions[:, i] for i, name in enumerate(names)}
    ).sort_by(job.key_column)
    output = output.replace_schema_metadata(
        {
            "batchscore.run_id": job.run_id,
            "batchscore.model_name": job.model_name,
            "batchscore.model_version": job.model_version,
            "batchscore.shard": str(shard.id),
        }
    )
    write_part(output, part)
    keys = output.column(job.key_column)
    return ShardResult(
        shard_id=shard.id,
        part=str(part),
        rows=output.num_rows,
        outputs=names,
        min_key=keys[0].as_py() if len(keys) else None,
        max_key=keys[-1].as_py() if len(keys) else None,
        seconds=time.perf_counter() - started,
        skipped=False,
        worker=worker,
        model_loads=_model_loads,
    )


def write_part(table: pa.Table, part: Path) -> None:
    """Write under a hidden temporary name, then rename: a part that exists is complete."""
    part.parent.mkdir(parents=True, exist_ok=True)
    temporary = part.with_name(f".{part.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temporary, row_group_size=PART_ROW_GROUP_ROWS, compression="zstd")
        os.replace(temporary, part)
    finally:
        temporary.unlink(missing_ok=True)


def existing_result(
    shard: Shard, part: Path, job: ScoreJob, worker: str = "", started: float | None = None
) -> ShardResult:
    """The result of a shard whose part is already complete, from the part's footer."""
    started = time.perf_counter() if started is None else started
    meta = pq.ParquetFile(part).metadata
    schema = meta.schema.to_arrow_schema()
    key_index = schema.names.index(job.key_column)
    first = meta.row_group(0).column(key_index).statistics if meta.num_row_groups else None
    last = meta.row_group(meta.num_row_groups - 1).column(key_index).statistics if first else None
    return ShardResult(
        shard_id=shard.id,
        part=str(part),
        rows=meta.num_rows,
        outputs=tuple(n for n in schema.names if n != job.key_column),
        min_key=first.min if first is not None and first.has_min_max else None,
        max_key=last.max if last is not None and last.has_min_max else None,
        seconds=time.perf_counter() - started,
        skipped=True,
        worker=worker,
        model_loads=_model_loads,
    )


@contextmanager
def dask_client(cluster: str, workers: int, threads_per_worker: int) -> Iterator[Client]:
    """A client on a LocalCluster, or on an existing scheduler (``tcp://host:8786``)."""
    if cluster != "local":
        with Client(cluster) as client:
            yield client
        return
    dashboard = ":0" if importlib.util.find_spec("bokeh") else None
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=dashboard,
            silence_logs=logging.ERROR,
        ) as local,
        Client(local) as client,
    ):
        yield client


Progress = Callable[[ShardResult, int, int], None]


def run_shards(
    client: Client,
    shards: Sequence[Shard],
    job: ScoreJob,
    *,
    threads_per_worker: int = 1,
    on_progress: Progress | None = None,
) -> tuple[list[ShardResult], dict[int, str]]:
    """Score every shard; return the results and the errors of shards that failed."""
    client.register_plugin(
        ModelPlugin(job.model_dir, job.spec, threads_per_worker), name=PLUGIN_NAME
    )
    futures = client.map(
        score_shard,
        list(shards),
        job=job,
        key=[f"score-{job.run_id}-{s.id}" for s in shards],
        retries=1,
        pure=False,
    )
    shard_of = {f.key: s for f, s in zip(futures, shards, strict=True)}
    results: list[ShardResult] = []
    errors: dict[int, str] = {}
    for done, future in enumerate(as_completed(futures), start=1):
        shard = shard_of[future.key]
        if future.status == "error":
            errors[shard.id] = f"{type(future.exception()).__name__}: {future.exception()}"
            log.error("shard %d (%s) failed: %s", shard.id, shard.path, errors[shard.id])
            continue
        result = future.result()
        results.append(result)
        if on_progress:
            on_progress(result, done, len(shards))
    return sorted(results, key=lambda r: r.shard_id), errors
