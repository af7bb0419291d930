"""Score shards on a Dask cluster: the model is loaded once per worker.

The driver downloads the model once per run; a ``WorkerPlugin`` carries only its
local path to each worker, where the model is loaded on first use and kept for
the worker's life, outside the task graph. Each shard's output part is written
under a temporary name and renamed into place: a part that exists is complete,
so a re-run skips it.

Clusters a run starts for itself (``STARTED_HERE``):

- ``local`` (the default): one Dask worker inside the run's own process, with a thread
  per shard scored at once. The driver has imported torch, MLflow and Great
  Expectations already and the model is loaded once, so a run pays no worker start-up:
  no process to spawn, nothing imported twice, no result pickled. torch and Arrow
  release the GIL, so the threads use every core;
- ``processes``: a LocalCluster of worker processes, for isolation (a model that
  crashes its process, a worker killed and restarted by its nanny);
- ``cuda``: dask-cuda's LocalCUDACluster, a worker process per GPU.
"""

from __future__ import annotations

import gc
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
from typing import TYPE_CHECKING

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from batchscore.core import storage
from batchscore.core.durable import sync
from scoring.errors import ShardFailed
from scoring.model import Predictor, pick_device
from scoring.reader import prefetch, read_row_groups
from scoring.shards import Shard
from scoring.spec import ModelSpec

if TYPE_CHECKING:
    from scoring.validation.suite import PartChecks

PLUGIN_NAME = "batchscore-model"
STARTED_HERE = ("local", "processes", "cuda")  # started for the run; others are addresses
QUICK_EXIT_PLUGIN = "batchscore-quick-exit"
PRE_SPAWN_ENV = "distributed.nanny.pre-spawn-environ"
PART_ROW_GROUP_ROWS = 32_768
# Arrow's memory pool: its default (mimalloc) keeps growing a worker's peak RSS over the
# first shards, so a small run's peak says little about a big one's; jemalloc's peak levels
# off after the first shards, at the same decoding speed. (The system allocator is flatter
# still but slower where Dask's nanny trims glibc's heap: every decoded row group then
# faults its pages in again.) A worker's memory is bounded by shard and row-group size, and
# its peak is what the runs report, so it should not depend on how many shards it has
# scored. A pool chosen by the user's own ARROW_DEFAULT_MEMORY_POOL is kept.
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")}
# glibc (torch's tensors, numpy's arrays): Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536,
# which also pins glibc's mmap threshold at its 128 KiB default, so every activation
# tensor above that size, in every batch, is a fresh mapping that the kernel zeroes and
# faults in page by page: for a small model that page work is a large share of the
# forward pass, and it buys nothing, since the next batch needs the same sizes. Heap
# memory is kept instead (the mmap threshold at glibc's maximum, 32 MiB; trimming only beyond 1 GiB
# free); peak memory is still bounded by shard and batch size. glibc reads these when
# the process starts, so they go in the nanny's pre-spawn environment. Values the user
# set are kept. CPU LocalCluster workers only.
WORKER_MALLOC_ENV = {
    name: os.environ.get(name, default)
    for name, default in (
        ("MALLOC_MMAP_THRESHOLD_", str(32 << 20)),
        ("MALLOC_TRIM_THRESHOLD_", str(1 << 30)),
    )
}
log = logging.getLogger(__name__)


def worker_process_env() -> dict[str, str]:
    """The environment a worker process starts with, wherever it is started: a
    LocalCluster's workers get it here; docker-compose's ``x-worker-env`` holds the same
    values for ``dask worker`` (tests/unit/test_compose.py keeps them equal)."""
    return WORKER_ENV | WORKER_MALLOC_ENV


@dataclass(frozen=True)
class ScoreJob:
    run_id: str
    model_dir: str
    model_name: str
    model_version: str
    spec: ModelSpec
    key_column: str
    parts_dir: str
    batch_size: int  # 0: the largest that fits (see Predictor.auto_batch_size)
    force: bool = False
    device: str = "auto"
    precision: str = "fp32"
    prefetch: int | None = None  # row groups decoded ahead; None: see prefetch_depth
    checks: PartChecks | None = None  # per-part expectations, run on each written part


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
    path: str = ""
    batch_size: int = 0
    peak_rss_bytes: int = 0
    threads: int = 0  # the most torch threads its forward passes had (ModelPlugin.share_cores)


class QuickExit(WorkerPlugin):
    """Registered on every local cluster: a closing worker freezes what it holds, so that
    its interpreter's exit skips a last garbage collection over all of it. With torch,
    MLflow and GX loaded that walk covers millions of objects that die with the process
    anyway, and the cluster's close (the end of the score step, of a re-check in the
    validate step) waits for it."""

    def teardown(self, worker: object) -> None:
        gc.freeze()


class ModelPlugin(WorkerPlugin):
    """Holds one loaded model per worker process, on the worker's device."""

    def __init__(
        self, model_dir: str, spec: ModelSpec, threads: int, device: str, precision: str
    ) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.threads = threads
        self.device = device
        self.precision = precision
        self._predictor: Predictor | None = None
        self._batch_size = 0
        self._lock = threading.Lock()
        self._slots = 1  # the worker's threads: shards it scores at once
        self._scoring = 0  # shards it is scoring now
        self.loads = 0  # how many times this worker loaded the model
        # Start-up is frozen out of the collector only in a worker process of its own:
        # frozen in the run's process, the driver's garbage would never be collected.
        self.driver_pid = os.getpid()

    def __getstate__(self) -> dict[str, object]:
        keep = ("model_dir", "spec", "threads", "device", "precision", "driver_pid")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._predictor = None
        self._batch_size = 0
        self._lock = threading.Lock()
        self._slots = 1
        self._scoring = 0
        self.loads = 0

    def setup(self, worker: object) -> None:
        """Load the model as the plugin arrives, on every worker at once, before any task."""
        import torch

        torch.set_num_threads(self.threads)
        self._slots = max(1, int(getattr(getattr(worker, "state", None), "nthreads", 1)))
        self.predictor()
        # What start-up loaded (torch, MLflow, the model) lives as long as the worker:
        # no garbage collection needs to walk it again.
        if os.getpid() != self.driver_pid:
            gc.freeze()

    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(
                    local_model(self.model_dir),
                    self.spec,
                    pick_device(self.device),
                    self.precision,  # type: ignore[arg-type]
                )
                self.loads += 1
            return self._predictor

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """A shard being scored on this worker, for ``share_cores``."""
        with self._lock:
            self._scoring += 1
        try:
            yield
        finally:
            with self._lock:
                self._scoring -= 1

    def share_cores(self) -> int:
        """Set the calling thread's forward passes to its share of the worker's cores, and
        return it (called before each batch's forward pass on CPU): ``threads`` while every
        thread of the worker scores a shard, more when fewer do. A run's last shards
        otherwise leave cores idle: with 7 shards on the in-process cluster's 2 threads,
        the last one ran alone on one core for a third of a second of a 2M-row score step.
        torch's intra-op thread count is the calling thread's own (OpenMP's and MKL's
        per-thread settings), so each thread sets its own. On a GPU the forward pass is not
        on these cores: nothing changes."""
        if self._predictor is None or self._predictor.device != "cpu":
            return self.threads
        import torch

        with self._lock:
            share = max(self.threads, self.threads * self._slots // max(self._scoring, 1))
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        return share

    def batch_size(self, requested: int) -> int:
        if requested > 0:
            return requested
        with self._lock:
            if not self._batch_size:
                assert self._predictor is not None
                self._batch_size = self._predictor.auto_batch_size()
            return self._batch_size


def local_model(model_dir: str) -> Path:
    """The model folder on this machine: the driver's copy, or, for a run folder on an
    object store, the run's copy there fetched once per machine (workers on other hosts
    share no folder with the driver)."""
    if not storage.is_remote(model_dir):
        return Path(model_dir)
    import hashlib
    import tempfile

    name = hashlib.sha256(model_dir.encode()).hexdigest()[:16]
    return storage.get_tree(model_dir, Path(tempfile.gettempdir()) / "batchscore-models" / name)


def score_shard(shard: Shard, job: ScoreJob) -> ShardResult:
    """Score one shard into its part; skip it when the part already exists.

    Row groups are decoded one at a time (ahead of compute where that pays, see
    ``prefetch_depth``), so a worker holds at most that depth + 1 row groups of
    features plus the shard's keys and predictions, however large the input is.
    """
    started = time.perf_counter()
    part = storage.join(job.parts_dir, shard.part_name)  # a path, or an object's URL
    worker = f"{socket.gethostname()}:{os.getpid()}"
    plugin = get_worker().plugins[PLUGIN_NAME]
    assert isinstance(plugin, ModelPlugin)
    if storage.exists(part) and not job.force:
        return existing_result(shard, part, job, worker, started, model_loads=plugin.loads)
    with plugin.scoring():  # until the part is written: a thread between shards is not idle
        return _score_into_part(shard, job, part, worker, plugin, started)


def _score_into_part(
    shard: Shard, job: ScoreJob, part: str, worker: str, plugin: ModelPlugin, started: float
) -> ShardResult:
    predictor = plugin.predictor()
    batch_size = plugin.batch_size(job.batch_size)
    columns = [job.key_column, *job.spec.features]
    keys: list[pa.ChunkedArray] = []
    predictions: list[np.ndarray] = []
    threads = 0

    def share() -> None:
        nonlocal threads
        threads = max(threads, plugin.share_cores())

    try:
        remote = any(storage.is_remote(p.path) for p in shard.pieces)
        depth = prefetch_depth(job.prefetch, predictor.device, remote=remote)
        for table in prefetch(read_row_groups(shard.pieces, columns), depth):
            keys.append(table.column(job.key_column))
            predictions.append(predictor.predict(table, batch_size, share))
    except (OSError, pa.ArrowException) as exc:
        raise ShardFailed(
            f"Shard {shard.id} ({shard.describe()}) could not be read",
            found=f"{type(exc).__name__}: {exc}",
            fix="Rewrite the file; the other shards' parts are kept",
        ) from None
    output = _output_table(shard, job, keys, predictions)
    write_part(output, part, job.key_column)
    check_written_part(output, part, shard, job)
    sorted_keys = output.column(job.key_column)
    return ShardResult(
        shard_id=shard.id,
        part=str(part),
        rows=output.num_rows,
        outputs=tuple(n for n in output.column_names if n != job.key_column),
        min_key=sorted_keys[0].as_py() if len(sorted_keys) else None,
        max_key=sorted_keys[-1].as_py() if len(sorted_keys) else None,
        seconds=time.perf_counter() - started,
        skipped=False,
        worker=worker,
        model_loads=plugin.loads,
        path=predictor.path,
        batch_size=batch_size,
        peak_rss_bytes=peak_rss_bytes(),
        threads=threads,
    )


def prefetch_depth(requested: int | None, device: str, *, remote: bool = False) -> int:
    """Row groups to decode ahead of compute: 2 when the model runs on a GPU, whose forward
    pass leaves the worker's CPU free for decoding; none on CPU, where the forward pass
    already runs on the worker's own threads, so a decoding thread only time-slices with it
    and adds its switching and queueing to every row group (docs/scoring.md). Input on an
    object store: 2 on CPU too, as a read there is mostly waiting for the network."""
    if requested is not None:
        return requested
    return 0 if device == "cpu" and not remote else 2


def check_written_part(output: pa.Table, part: str, shard: Shard, job: ScoreJob) -> None:
    """Run the per-part expectations while the part is in memory (``scoring.validation``).

    A failure to check never fails the shard: the validate step checks again any
    part without a fresh result.
    """
    if job.checks is None:
        return
    from scoring.validation.suite import PartTarget, check_part

    try:
        check_part(output, PartTarget(shard.id, str(part), shard.rows), job.checks)
    except Exception:
        log.exception("per-part checks of %s failed; the validate step checks it again", part)


def _output_table(
    shard: Shard, job: ScoreJob, keys: list[pa.ChunkedArray], predictions: list[np.ndarray]
) -> pa.Table:
    matrix = np.concatenate(predictions) if predictions else np.empty((0, 1), np.float32)
    rows = sum(len(k) for k in keys)
    if len(matrix) != rows:
        raise ShardFailed(
            f"Model returned {len(matrix)} predictions for {rows} rows of shard {shard.id} "
            f"({shard.describe()})",
            expected="one prediction per input row",
        )
    names = job.spec.output_names(matrix.shape[1])
    key_column = pa.chunked_array([c for k in keys for c in k.chunks], type=keys[0].type)
    output = _sorted_by_key(
        pa.table({job.key_column: key_column} | {n: matrix[:, i] for i, n in enumerate(names)}),
        job.key_column,
    )
    return output.replace_schema_metadata(
        {
            "batchscore.run_id": job.run_id,
            "batchscore.model_name": job.model_name,
            "batchscore.model_version": job.model_version,
            "batchscore.shard": str(shard.id),
        }
    )


def _sorted_by_key(table: pa.Table, key: str) -> pa.Table:
    """Sort a part by key; integer keys take numpy's quicksort (vectorised: 5 ms for
    286,000 int64 keys, against 21 ms for its stable sort and 25 ms for Arrow's). Keys
    are unique in a run that passes validation, so a stable order among equal keys
    would buy nothing."""
    column = table.column(key)
    if pa.types.is_integer(column.type) and column.null_count == 0:
        return table.take(np.argsort(column.to_numpy(), kind="quicksort"))
    return table.sort_by(key)


def peak_rss_bytes() -> int:
    """This process's own peak resident memory so far.

    Linux's ``VmHWM`` is the high-water mark of this process image alone;
    ``getrusage``'s ``ru_maxrss`` (the fallback elsewhere) also carries the
    peak of the parent a spawned worker was forked from, which would report
    the driver's memory as the worker's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_part(table: pa.Table, part: str | Path, key: str) -> None:
    """Write under a hidden temporary name, then rename: a part that exists is complete.

    Durably: the file is synced before the rename and the folder after it, so a power
    loss leaves no part or a whole one (``usable_part`` catches what a disk loses anyway).
    On an object store the part is uploaded under a hidden temporary key and copied to
    its name in one request (``batchscore.core.storage.put_bytes``): an upload cut short
    never lands under the part's name.
    """
    if storage.is_remote(part):
        storage.write_parquet(table, part, **part_options(table, key))
        return
    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    temporary = part.with_name(f".{part.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temporary, **part_options(table, key))
        sync(temporary)
        os.replace(temporary, part)
        sync(part.parent)
    finally:
        temporary.unlink(missing_ok=True)


def part_options(table: pa.Table, key: str) -> dict[str, object]:
    """How a part is written: zstd, without dictionaries (keys are unique and predictions
    all but unique, so a dictionary is built for nothing and then abandoned: a part wrote
    in a third of the time and came out half the size without them), and integer keys,
    sorted in a part, as deltas (``DELTA_BINARY_PACKED``: a few bits a key). Statistics
    stay on: a part's key range is read from them."""
    integer = pa.types.is_integer(table.schema.field(key).type)
    deltas = {key: "DELTA_BINARY_PACKED"} if integer else None
    return {
        "row_group_size": PART_ROW_GROUP_ROWS,
        "compression": "zstd",
        "use_dictionary": False,
        "column_encoding": deltas,
    }


def usable_part(part: str | Path, rows: int) -> str | None:
    """Why an existing part cannot be kept (its footer unreadable, or not ``rows`` rows),
    or None when it can: a footer read (a ranged read on an object store), cheap whatever
    the part's size."""
    try:
        found = storage.read_metadata(part).num_rows
    except (OSError, pa.ArrowException) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if found == rows else f"{found} rows, the shard has {rows}"


def set_aside(part: str | Path) -> str:
    """Move a damaged part out of the way (kept for inspection) so its shard is rescored."""
    if storage.is_remote(part):
        name = f"{storage.name_of(part)}.{uuid.uuid4().hex[:8]}"
        moved = storage.join(storage.parent_of(part), ".damaged", name)
        storage.move(part, moved)
        return moved
    part = Path(part)
    aside = part.parent / ".damaged" / f"{part.name}.{uuid.uuid4().hex[:8]}"
    aside.parent.mkdir(exist_ok=True)
    os.replace(part, aside)
    sync(part.parent)
    return str(aside)


def existing_result(
    shard: Shard,
    part: str | Path,
    job: ScoreJob,
    worker: str = "",
    started: float | None = None,
    *,
    model_loads: int = 0,
) -> ShardResult:
    """The result of a shard whose part is already complete, from the part's footer."""
    started = time.perf_counter() if started is None else started
    meta = storage.read_metadata(part)
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
        model_loads=model_loads,
    )


def resolve_cluster(cluster: str) -> str:
    """``auto`` picks ``cuda`` when this machine has a GPU, else ``local`` (in-process)."""
    if cluster != "auto":
        return cluster
    import torch

    return "cuda" if torch.cuda.is_available() else "local"


@contextmanager
def dask_client(
    cluster: str, workers: int, threads_per_worker: int, *, dashboard: bool | None = None
) -> Iterator[Client]:
    """A client on a LocalCluster, a dask-cuda LocalCUDACluster, or an existing scheduler.

    ``local``, ``processes`` and ``cuda`` are started for the run, with a dashboard as
    ``dashboard_address`` decides; any other value is the address of a scheduler that is
    already running (which addresses a run may name is the settings' rule, checked before
    a run starts). ``cuda`` starts one worker per visible GPU (``CUDA_VISIBLE_DEVICES`` is
    respected) and imports dask-cuda only then: the CPU path never needs it.
    """
    cluster = resolve_cluster(cluster)
    if cluster not in STARTED_HERE:
        with Client(cluster) as client:
            yield client
        return
    address = dashboard_address(cluster, dashboard)
    if cluster == "local":
        with _in_process_cluster(workers * threads_per_worker, address) as in_process:
            with Client(in_process) as client:
                yield client
        return
    with _spawned_workers_skip_main_script():
        with _local_cluster(cluster, workers, threads_per_worker, address) as local_cluster:
            with Client(local_cluster) as client:
                client.register_plugin(QuickExit(), name=QUICK_EXIT_PLUGIN)
                yield client


@contextmanager
def _spawned_workers_skip_main_script() -> Iterator[None]:
    """Keep worker processes from re-running this process's main script.

    Dask starts workers with ``spawn``, which re-imports the parent's
    ``__main__`` from its file. Inside an Airflow task that file is the
    ``airflow`` script, and importing Airflow there fails (the task supervisor
    points the task's database URL at ``airflow-db-not-allowed:///``); from the
    CLI it would import the whole CLI for nothing. Workers need only
    ``scoring.engine``, so the main script's file is hidden while the cluster
    lives (restarted workers included).
    """
    import sys

    main = sys.modules["__main__"]
    saved = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if saved is not None:
            main.__file__ = saved


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment while the block runs; as it was after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serves_dashboard(cluster: str, wanted: bool | None) -> bool:
    """Whether a cluster started for the run serves a dashboard.

    ``wanted`` is ``BATCHSCORE_DASHBOARD``; unset, a cluster of worker processes has one
    and the in-process ``local`` cluster has none: importing bokeh and setting up its
    pages takes about 0.7 s of CPU, a tenth of a few-million-row run's score step on two
    cores. Without bokeh there is none either.
    """
    wants = wanted if wanted is not None else resolve_cluster(cluster) != "local"
    return wants and importlib.util.find_spec("bokeh") is not None


def dashboard_address(cluster: str, wanted: bool | None) -> str | None:
    """Where a cluster started for the run serves its dashboard (a free port), or None."""
    if serves_dashboard(cluster, wanted):
        return ":0"
    if wanted:
        log.warning("no Dask dashboard: it needs bokeh (pip install 'bokeh>=3.1')")
    return None


def dashboard_link(client: Client, cluster: str, wanted: bool | None) -> str | None:
    """The dashboard's link, or None where there is none. A scheduler without a dashboard
    still answers /health and /metrics over HTTP, and its client reports that server as
    the dashboard; a running cluster's dashboard is whatever its scheduler serves."""
    if resolve_cluster(cluster) in STARTED_HERE and not serves_dashboard(cluster, wanted):
        return None
    return client.dashboard_link or None


@contextmanager
def _in_process_cluster(threads: int, dashboard: str | None) -> Iterator[LocalCluster]:
    """One worker in this process, ``threads`` shards scored at once (``--workers`` ×
    ``--threads-per-worker``), each forward pass on its own thread."""
    _use_jemalloc()
    with LocalCluster(
        n_workers=1,
        threads_per_worker=threads,
        processes=False,
        dashboard_address=dashboard,
        scheduler_kwargs=_bare_http_server(dashboard),
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


def _bare_http_server(dashboard: str | None) -> dict[str, str] | None:
    """Without a dashboard, the scheduler still serves /health and /metrics over HTTP:
    on a free loopback port rather than Dask's 8787, which another Dask on the host (or
    another run's cluster) may hold, and which the run does not report."""
    return None if dashboard else {"dashboard_address": "127.0.0.1:0"}


def _use_jemalloc() -> None:
    """Arrow's jemalloc pool in this process, as ``WORKER_ENV`` gives worker processes
    (why: see there); the user's own ARROW_DEFAULT_MEMORY_POOL is kept."""
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # an Arrow built without jemalloc
        log.debug("Arrow has no jemalloc here; keeping %s", pa.default_memory_pool().backend_name)


@contextmanager
def _local_cluster(
    cluster: str, workers: int, threads_per_worker: int, dashboard: str | None
) -> Iterator[LocalCluster]:
    if cluster == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise ShardFailed(
                "The cuda cluster needs dask-cuda",
                found=str(exc),
                fix="pip install 'batchscore[gpu]', or use --cluster local",
            ) from None
        local_cluster = LocalCUDACluster(  # sets each worker's env itself (its GPU)
            threads_per_worker=threads_per_worker,
            dashboard_address=dashboard,
            scheduler_kwargs=_bare_http_server(dashboard),
            silence_logs=logging.ERROR,
        )
    else:
        pre_spawn = dask.config.get(PRE_SPAWN_ENV) | WORKER_MALLOC_ENV
        # Each nanny keeps its copy. A nanny prefers the process's own environment to the
        # config, and writes its values there as it spawns: a LocalCluster started earlier
        # in this process with Dask's defaults would have left MALLOC_TRIM_THRESHOLD_=65536
        # behind for ours to pick up, so the process's environment says ours meanwhile.
        with dask.config.set({PRE_SPAWN_ENV: pre_spawn}), _environ(WORKER_MALLOC_ENV):
            local_cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                env=WORKER_ENV,
                dashboard_address=dashboard,
                scheduler_kwargs=_bare_http_server(dashboard),
                silence_logs=logging.ERROR,
            )
    with local_cluster:
        yield local_cluster


Progress = Callable[[ShardResult, int, int], None]


def run_shards(
    client: Client,
    shards: Sequence[Shard],
    job: ScoreJob,
    *,
    threads_per_worker: int = 1,
    torch_threads: int | None = None,
    on_progress: Progress | None = None,
) -> tuple[list[ShardResult], dict[int, str]]:
    """Score every shard; return the results and the errors of shards that failed.

    Each result is released on the cluster as soon as it is gathered, so a
    worker lost later costs only the shards it was still scoring.
    """
    client.register_plugin(
        ModelPlugin(
            job.model_dir, job.spec, torch_threads or threads_per_worker, job.device, job.precision
        ),
        name=PLUGIN_NAME,
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
            error = future.exception()
            errors[shard.id] = f"{type(error).__name__}: {error}"
            log.error("shard %d (%s) failed: %s", shard.id, shard.describe(), errors[shard.id])
        else:
            result = future.result()
            results.append(result)
            if on_progress:
                on_progress(result, done, len(shards))
        future.release()
    return sorted(results, key=lambda r: r.shard_id), errors
