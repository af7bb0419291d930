"""Runs on a Dask cluster that outlives them, deployed as docker-compose deploys it
(``batchscore.devcluster``: real ``dask scheduler`` and ``dask worker --preload
scoring.preload`` processes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchscore.core.settings import RunSettings, load_settings
from batchscore.devcluster import RunningCluster
from jobs import data_docs, steps
from jobs.manifest import load_manifest
from tests.conftest import KEY, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
WORKERS = 2
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningCluster]:
    running = RunningCluster(tmp_path, WORKERS, pythonpath=REPO)  # the test models' classes
    try:
        yield running
    finally:
        running.stop()


def _imported() -> dict[str, bool]:
    return {m: m in sys.modules for m in ("torch", "mlflow.pytorch", "great_expectations")}


def _pid() -> int:
    return os.getpid()


def test_a_run_on_a_running_cluster_uses_its_preloaded_workers(
    env: dict[str, str], dataset: Path, cluster: RunningCluster
) -> None:
    before = cluster.client.run(_imported)
    assert all(all(found.values()) for found in before.values()), before  # the preload
    manifest = run_job(dataset, "models:/churn@champion", "on-cluster", cluster=cluster.address)
    assert manifest.published and manifest.summary()["rows"] == 12_000
    worker_pids = set(cluster.client.run(_pid).values())
    scored_by = {int(s.worker.rsplit(":", 1)[1]) for s in manifest.shards}
    assert scored_by <= worker_pids and len(manifest.shards) == 6
    validate = manifest.steps["validate"]
    assert validate["success"] and validate["parts_reused"] == len(manifest.shards)
    assert validate["docs_built_on"] == cluster.address  # not in the validate task's process
    assert Path(manifest.reports["data_docs"]).is_file()
    # No worker was lost or restarted by the run.
    assert set(cluster.client.run(_pid).values()) == worker_pids


def test_data_docs_are_built_here_when_the_cluster_is_gone(
    env: dict[str, str], dataset: Path, cluster: RunningCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn@champion",
        key_column=KEY,
        namespace="cluster-gone",
        cluster=cluster.address,
    )
    ref = steps.resolve(settings, params)
    steps.plan(ref["run_dir"])
    steps.score(ref["run_dir"])
    cluster.stop_scheduler()
    monkeypatch.setattr(data_docs, "CLUSTER_TIMEOUT", 3)
    steps.validate(ref["run_dir"])  # every part was checked as it was scored: no cluster needed
    manifest = load_manifest(ref["run_dir"])
    validate = manifest.steps["validate"]
    assert validate["success"] and validate["docs_built_on"] == "validate task"
    assert Path(manifest.reports["data_docs"]).is_file()
