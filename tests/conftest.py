"""Shared fixtures: a real MLflow registry (SQLite), datasets, a real redis-server, the API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

# RedisServer and free_port are imported from here by the tests (tests.conftest).
from batchscore.testing import (
    RedisClusterServers,
    RedisServer,
    ServiceError,
    free_port,
    wait_for_http,
)

if TYPE_CHECKING:
    from jobs.manifest import Manifest
    from kv_export.store import NewVersion, PredictionStore

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

N_FEATURES = 8
KEY = "customer_id"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    artifact_root: Path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A real MLflow tracking store (SQLite) with the models the tests score.

    churn v1 (@champion) and v2: pickled MLPs with a column signature, different weights;
    churn_pt2 v1 (@champion): the same kind of MLP in MLflow's default pt2 format;
    broken v1 (@champion): an MLP whose outputs are NaN.
    """
    from batchscore.samples import log_and_register, train_model

    root = tmp_path_factory.mktemp("mlflow")
    found = Registry(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")

    def register(model: object, name: str, serialization: str = "pickle") -> None:
        log_and_register(
            model,
            tracking_uri=found.tracking_uri,
            artifact_root=found.artifact_root,
            name=name,
            # Named, not left to the process: an earlier test's MlflowRegistry may have
            # pointed MLflow's process-wide registry URI at a server that is gone since.
            registry_uri=found.tracking_uri,
            n_features=N_FEATURES,
            serialization=serialization,  # type: ignore[arg-type]
            alias="champion",
        )

    import torch

    first, second = train_model(N_FEATURES, seconds=0.3, seed=1), train_model(N_FEATURES, 0.3, 2)
    register(first, "churn")
    register(second, "churn")
    client_alias("churn", "1", found.tracking_uri)
    register(train_model(N_FEATURES, seconds=0.3, seed=3), "churn_pt2", "pt2")
    broken = train_model(N_FEATURES, seconds=0.1, seed=4)
    with torch.no_grad():
        for parameter in broken.parameters():  # type: ignore[attr-defined]
            parameter.fill_(float("nan"))
    register(broken, "broken")
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set by MLflow above; it follows tracking
    return found


def client_alias(name: str, version: str, tracking_uri: str, alias: str = "champion") -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        name, alias, version
    )


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12,000 rows over 3 files (in dt= partition folders), 4 row groups of 1,000 each."""
    from batchscore.samples import make_dataset

    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, rows=12_000, files=3, row_group_rows=1_000, n_features=N_FEATURES)
    return folder


@pytest.fixture
def env(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a run: its own BATCHSCORE_HOME, the shared registry."""
    values = {
        "BATCHSCORE_HOME": str(tmp_path / "home"),
        "BATCHSCORE_WORKERS": "2",
        "BATCHSCORE_SHARD_ROWS": "2000",
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    # mlflow.set_registry_uri (called in-process by earlier tests' MlflowRegistry) writes
    # MLFLOW_REGISTRY_URI into os.environ; left there it would point a test's subprocesses
    # at another registry than the MLFLOW_TRACKING_URI it sets. Unset: it follows tracking.
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return dict(os.environ)


def read_rows(folder: Path, keys: list[int]) -> dict[int, np.ndarray]:
    """The feature vectors of the given keys, straight from the input files."""
    from batchscore.samples import feature_names

    names = feature_names(N_FEATURES)
    table = pq.ParquetDataset(str(folder)).read(columns=[KEY, *names])
    frame = table.to_pandas().set_index(KEY)
    return {k: frame.loc[k, names].to_numpy(dtype=np.float32) for k in keys}


def direct_forward(tracking_uri: str, model_uri: str, rows: np.ndarray) -> np.ndarray:
    """What the registered model itself computes for these rows."""
    import mlflow.pytorch
    import torch

    # The process-wide URIs, not only the variable: an in-process MlflowRegistry (or
    # mlflow.set_*_uri) of an earlier test, perhaps of a server gone since, wins over it.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pytorch.load_model(model_uri)
    with torch.no_grad():
        return model(torch.from_numpy(rows)).numpy().reshape(len(rows), -1)


def new_version(run: str, keys: int, outputs: tuple[str, ...] = ("p",)) -> NewVersion:
    """A version of the store tests' model "m" (version ``run``), keyed by column "k"."""
    from kv_export.encoding import bucket_count
    from kv_export.store import NewVersion

    return NewVersion(
        run_id=run,
        expected_keys=keys,
        buckets=bucket_count(keys),
        outputs=list(outputs),
        model_name="m",
        model_version=run,
        scored_at="2026-11-23T00:00:00+00:00",
        key_column="k",
    )


def wait_past(stamp: str) -> None:
    """Sleep until the ISO instant ``stamp`` (a version's ``expires_at``) has passed."""
    import time
    from datetime import UTC, datetime

    left = (datetime.fromisoformat(stamp) - datetime.now(UTC)).total_seconds()
    time.sleep(max(left, 0.0) + 0.05)


def load_version(store: PredictionStore, run: str, values: np.ndarray, *, chunk: int = 1000) -> int:
    """A complete, unpublished version of namespace "ns": the keys "0".."n-1" hold the rows
    of ``values`` (one output "p"), written ``chunk`` keys at a time; its number."""
    from kv_export.encoding import encode_keys, pack_values

    keys = len(values)
    info = store.begin_version("ns", new_version(run, keys))
    names, packed = encode_keys(range(keys)), pack_values(values)
    for start in range(0, keys, chunk):
        store.write("ns", info, names[start : start + chunk], packed[start : start + chunk])
    return store.complete_version("ns", info.version, keys).version


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(shared_redis_cluster: RedisClusterServers) -> RedisClusterServers:
    """A real Redis Cluster (3 primaries, 3 replicas) shared by the session, emptied for
    the test; a test that kills or reshards nodes starts its own ``RedisClusterServers``."""
    shared_redis_cluster.flush()
    return shared_redis_cluster


class ApiProcess:
    def __init__(self, env: dict[str, str], store_url: str, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"api-{self.port}.log"
        self._handle = self.log.open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "batchscore"), "serve", "--store", store_url, "--port", str(self.port)],
            env=env | {"BATCHSCORE_STORE_TIMEOUT_SECONDS": "0.3"},
            stdout=self._handle,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(f"{self.base}/healthz", seconds=60, process=self.process)
        except ServiceError as exc:
            self.stop()
            raise AssertionError(f"the API did not start: {exc}\n{self.log.read_text()}") from exc

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10)

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(self.base + path, json=body, timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._handle.close()


@pytest.fixture
def api_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``batchscore serve`` subprocess: no BATCHSCORE_ setting of the
    caller's, its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    return env | {"BATCHSCORE_HOME": str(tmp_path / "home")}


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[object]:
    started: list[ApiProcess] = []

    def start(env: dict[str, str], store_url: str) -> ApiProcess:
        api = ApiProcess(env, store_url, tmp_path)
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real console script in a subprocess, as a user runs it."""
    return subprocess.run(
        [str(BIN / "batchscore"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_job(dataset: Path, model: str, namespace: str, **given: Any) -> Manifest:
    """The whole pipeline in this process, as `batchscore run` runs it, for the test dataset."""
    from batchscore.core.settings import RunSettings, load_settings
    from jobs import steps
    from jobs.pipeline import run_pipeline

    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri=model,
        key_column=KEY,
        namespace=namespace,
        **given,
    )
    return run_pipeline(settings, params)
