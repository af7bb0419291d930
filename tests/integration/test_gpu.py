"""The GPU path: what can run on a CPU runs everywhere; the rest skips without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchscore.samples import feature_names
from scoring.engine import ScoreJob, dask_client, resolve_cluster, run_shards
from scoring.errors import ShardFailed
from scoring.inputs import inspect_input
from scoring.model import Predictor
from scoring.reference import MLP
from scoring.shards import plan_shards
from scoring.spec import read_model_spec

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
N = 16


def saved_model(folder: Path, serialization: str = "pickle") -> Path:
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    path = folder / f"model-{serialization}"
    if path.exists():
        return path
    torch.manual_seed(0)
    model = MLP(N, hidden=(32, 32), sigmoid=True).eval()
    if serialization == "pt2":
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
        )
        example = np.zeros((4, N), dtype=np.float32)
    else:
        signature = ModelSignature(
            inputs=Schema([ColSpec("float", n) for n in feature_names(N)]),
            outputs=Schema([ColSpec("float", "p")]),
        )
        example = None
    mlflow.pytorch.save_model(
        model,
        str(path),
        signature=signature,
        input_example=example,
        serialization_format=serialization,
        pip_requirements=["torch"],
    )
    return path


def features_table(rows: int = 5000) -> pa.Table:
    rng = np.random.default_rng(0)
    columns = {n: rng.standard_normal(rows).astype(np.float32) for n in feature_names(N)}
    return pa.table({"k": np.arange(rows)} | columns)


class OutOfMemoryAbove(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` rows."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_auto_cluster_is_local_without_a_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "local"
    assert resolve_cluster("auto") == expected
    assert resolve_cluster("tcp://scheduler:8786") == "tcp://scheduler:8786"


@pytest.mark.skipif(
    importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed"
)
def test_cuda_cluster_without_dask_cuda_says_how_to_get_it() -> None:
    with pytest.raises(ShardFailed, match=r"batchscore\[gpu\]"):
        with dask_client("cuda", 1, 1):
            pass


def test_the_device_path_matches_plain_fp32_scoring(tmp_path: Path) -> None:
    """Pinned buffer, batching and autocast, exercised on the CPU with bf16."""
    spec = read_model_spec(saved_model(tmp_path))
    table = features_table()
    plain = Predictor(saved_model(tmp_path), spec).predict(table, 1000)
    mixed = Predictor(saved_model(tmp_path), spec, precision="bf16").predict(table, 700)
    assert mixed.shape == plain.shape == (5000, 1)
    np.testing.assert_allclose(mixed, plain, atol=2e-2)


def test_an_out_of_memory_batch_is_halved_and_retried(tmp_path: Path) -> None:
    """The halving rule, with the out-of-memory error simulated: a wrapper raises
    ``torch.cuda.OutOfMemoryError`` above a batch size, so this runs on a CPU too and
    shows the rule, not a real CUDA allocation failure."""
    spec = read_model_spec(saved_model(tmp_path))
    predictor = Predictor(saved_model(tmp_path), spec, precision="bf16")
    expected = predictor.predict(features_table(), 5000)
    predictor._torch = OutOfMemoryAbove(predictor._torch, limit=600)
    got = predictor.predict(features_table(), 5000)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert predictor._torch.sizes[:4] == [5000, 2500, 1250, 625]
    assert max(s for s in predictor._torch.sizes if s <= 600) == 312


@needs_gpu
@pytest.mark.parametrize("serialization", ["pickle", "pt2"])
def test_gpu_predictions_equal_cpu_predictions(tmp_path: Path, serialization: str) -> None:
    model_dir = saved_model(tmp_path, serialization)
    features = tuple(feature_names(N)) if serialization == "pt2" else None
    spec = read_model_spec(model_dir, features)
    table = features_table()
    on_cpu = Predictor(model_dir, spec, "cpu").predict(table, 1024)
    on_gpu = Predictor(model_dir, spec, "cuda").predict(table, 1024)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-5)


@needs_gpu
def test_dask_cuda_cluster_scores_every_row_once(tmp_path: Path) -> None:
    model_dir = saved_model(tmp_path)
    spec = read_model_spec(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        table = features_table(4000)
        table = table.set_column(0, "k", pa.array(np.arange(4000) + i * 4000))
        pq.write_table(table, data / f"{i}.parquet", row_group_size=1000)
    shards = plan_shards(inspect_input(data, spec.features, "k").files, 2500)
    job = ScoreJob(
        run_id="gpu",
        model_dir=str(model_dir),
        model_name="m",
        model_version="1",
        spec=spec,
        key_column="k",
        parts_dir=str(tmp_path / "parts"),
        batch_size=0,
        device="auto",
    )
    with dask_client("cuda", 1, 1) as client:
        results, errors = run_shards(client, shards, job)
    assert errors == {}
    assert {r.path for r in results} == {"torch-cuda"}
    keys = pq.ParquetDataset(str(tmp_path / "parts")).read(columns=["k"]).column("k").to_pylist()
    assert sorted(keys) == list(range(12_000))


def test_preload_warms_cuda_only_where_there_is_a_gpu() -> None:
    """``dask worker --preload scoring.preload`` creates the CUDA context and loads cuBLAS
    on a GPU worker before any run; on a CPU worker it leaves CUDA alone."""
    from scoring.preload import warm_cuda

    assert warm_cuda() is torch.cuda.is_available()
    if torch.cuda.is_available():
        assert torch.cuda.is_initialized()
    else:
        assert not torch.cuda.is_initialized()
