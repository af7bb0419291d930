"""Scoring survives losing a worker, and a bounded number of failed shards when asked to."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.core.settings import RunSettings, load_settings
from batchscore.samples import feature_names
from jobs import steps
from jobs.manifest import load_manifest
from jobs.pipeline import run_pipeline
from kv_export.store import open_store
from scoring.engine import (
    PLUGIN_NAME,
    QUICK_EXIT_PLUGIN,
    ModelPlugin,
    ScoreJob,
    ShardResult,
    dask_client,
    run_shards,
)
from scoring.errors import ShardFailed
from scoring.inputs import inspect_input
from scoring.shards import plan_shards
from scoring.spec import read_model_spec
from tests.conftest import KEY, N_FEATURES
from tests.slow_model import SlowMLP

pytestmark = [pytest.mark.slow]


def write_input(folder: Path, files: int = 3, rows: int = 4000, group: int = 1000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        columns = {KEY: np.arange(rows, dtype=np.int64) + i * rows}
        columns |= {
            f: rng.standard_normal(rows).astype(np.float32) for f in feature_names(N_FEATURES)
        }
        pq.write_table(
            pa.table(columns), folder / f"{i}.parquet", row_group_size=group, compression="snappy"
        )
    return folder


def slow_model(folder: Path) -> Path:
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("float", n) for n in feature_names(N_FEATURES)]),
        outputs=Schema([ColSpec("float", "p")]),
    )
    path = folder / "slow-model"
    mlflow.pytorch.save_model(
        SlowMLP(N_FEATURES, seconds_per_call=0.15).eval(),
        str(path),
        signature=signature,
        serialization_format="pickle",
        pip_requirements=["torch"],
    )
    return path


def test_a_killed_worker_costs_only_its_own_shards(tmp_path: Path) -> None:
    data = write_input(tmp_path / "in", files=3, rows=4000, group=500)
    model_dir = slow_model(tmp_path)
    spec = read_model_spec(model_dir)
    shards = plan_shards(inspect_input(data, spec.features, KEY).files, 1000)  # 12 shards
    parts = tmp_path / "parts"
    job = ScoreJob(
        run_id="kill",
        model_dir=str(model_dir),
        model_name="slow",
        model_version="1",
        spec=spec,
        key_column=KEY,
        parts_dir=str(parts),
        batch_size=500,
        device="cpu",
    )
    done_before_kill: dict[str, int] = {}
    killed: list[int] = []

    def kill_one_worker(result: ShardResult, done: int, total: int) -> None:
        if killed:
            return
        for part in parts.glob("part-*.parquet"):
            done_before_kill[part.name] = part.stat().st_mtime_ns
        pid = int(result.worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the nanny restarts it; its shards go elsewhere
        killed.append(pid)

    with dask_client("processes", 2, 1) as client:  # a worker process of its own to kill
        results, errors = run_shards(client, shards, job, on_progress=kill_one_worker)
    assert killed and errors == {}
    assert sorted(r.shard_id for r in results) == [s.id for s in shards]
    table = pq.ParquetDataset(str(parts)).read(columns=[KEY])
    assert sorted(table.column(KEY).to_pylist()) == list(range(12_000))  # each row once
    for name, mtime in done_before_kill.items():
        assert (parts / name).stat().st_mtime_ns == mtime, f"{name} was scored again"
    assert len(done_before_kill) < len(shards)


def corrupt_a_row_group(path: Path, row_group: int) -> None:
    """Garble one column chunk's pages; the footer stays readable."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(3)
    data = bytearray(path.read_bytes())
    start, size = column.data_page_offset, column.total_compressed_size
    data[start + 20 : start + size - 4] = np.random.default_rng(1).bytes(size - 24)
    path.write_bytes(bytes(data))


@pytest.mark.e2e
def test_max_failed_shards_lets_a_run_finish_without_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = write_input(tmp_path / "in", files=3, rows=4000, group=1000)
    corrupt_a_row_group(data / "1.parquet", 2)
    settings = load_settings(RunSettings)
    strict = steps.make_params(
        settings,
        input_path=str(data),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace="partial",
    )
    with pytest.raises(ShardFailed, match=r"1 of 6 shards failed.*1\.parquet row groups 2-3"):
        run_pipeline(settings, strict)
    store = open_store(settings.resolved_store_url)
    assert store.state("partial").versions == {}

    lenient = strict.model_copy(update={"max_failed_shards": 1})
    manifest = run_pipeline(settings, lenient)  # the same run, resumed: 5 parts exist
    assert manifest.published
    score = manifest.steps["score"]
    assert (score["shards_skipped"], score["shards_failed"]) == (5, 1)  # only it was retried
    failed = manifest.summary()["failed_shards"]
    assert (
        len(failed) == 1 and failed[0]["rows"] == 2000 and "could not be read" in failed[0]["error"]
    )
    assert manifest.steps["validate"]["rows"] == 10_000
    assert manifest.steps["validate"]["rows_of_failed_shards"] == 2000
    live = store.state("partial").live_info()
    assert live is not None and live.key_count == 10_000
    assert load_manifest(manifest.run_dir).validation["success"] is True


@pytest.mark.parametrize("cluster", ["local", "processes"])
def test_workers_allocate_arrow_memory_with_jemalloc(cluster: str) -> None:
    """Peak RSS per worker must not depend on how many shards it scored: Arrow memory from
    jemalloc, not Arrow's default mimalloc (see scoring.engine.WORKER_ENV), in a worker
    process and in the run's own process alike."""

    def backend() -> str:
        return str(pa.default_memory_pool().backend_name)

    with dask_client(cluster, 1, 1) as client:
        assert set(client.run(backend).values()) == {"jemalloc"}


def page_faults_of_reallocating(size: int, times: int = 5) -> int:
    """Minor page faults of allocating and freeing ``size`` bytes ``times`` times, after
    once: memory kept by the heap is not faulted in again, a fresh mapping is."""
    import resource

    bytearray(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        bytearray(size)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_local_workers_keep_glibc_heap_memory_instead_of_mmapping_each_batch() -> None:
    """A 16 MiB allocation (a batch's activations) freed and made again comes from the
    worker's heap, not from a fresh mapping faulted in page by page
    (scoring.engine.WORKER_MALLOC_ENV)."""

    def environment() -> dict[str, str | None]:
        return {n: os.environ.get(n) for n in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}

    with dask_client("processes", 1, 1) as client:
        (found,) = client.run(environment).values()
        (faults,) = client.run(page_faults_of_reallocating, 16 << 20).values()
    kept = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    assert found == kept
    assert faults < 1_000  # mmapped afresh each time, 16 MiB would be 5 x 4,096 faults


HELD: list[list[int]] = []


def hold_new_objects() -> int:
    HELD.extend([i] for i in range(10_000))  # tracked by the collector, not yet frozen
    return gc.get_freeze_count()


def test_the_model_plugin_freezes_what_start_up_loaded(tmp_path: Path) -> None:
    """Once the model is loaded, no collection walks torch, MLflow or the model again."""
    model_dir = slow_model(tmp_path)
    plugin = ModelPlugin(str(model_dir), read_model_spec(model_dir), 1, "cpu", "fp32")
    with dask_client("processes", 1, 1) as client:
        client.register_plugin(plugin, name=PLUGIN_NAME)
        (frozen,) = client.run(gc.get_freeze_count).values()
    assert frozen > 100_000  # torch's and MLflow's objects, at the least


def test_the_run_process_is_not_frozen_by_an_in_process_worker(tmp_path: Path) -> None:
    """In-process (``local``), freezing would keep the driver's garbage forever."""
    model_dir = slow_model(tmp_path)
    plugin = ModelPlugin(str(model_dir), read_model_spec(model_dir), 1, "cpu", "fp32")
    gc.unfreeze()
    with dask_client("local", 1, 1) as client:
        client.register_plugin(plugin, name=PLUGIN_NAME)
        (frozen,) = client.run(gc.get_freeze_count).values()
    assert frozen == 0


def test_a_local_cluster_worker_freezes_everything_as_it_closes() -> None:
    """So that its exit skips a last collection over all it loaded (scoring.engine.QuickExit)."""
    with dask_client("processes", 1, 1) as client:
        (before,) = client.run(hold_new_objects).values()
        client.unregister_worker_plugin(QUICK_EXIT_PLUGIN)  # as the worker's close does
        (after,) = client.run(gc.get_freeze_count).values()
    assert after >= before + 10_000
