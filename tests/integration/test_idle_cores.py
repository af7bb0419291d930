"""On a real in-process Dask cluster, a shard scored alone takes the cores of the worker's
idle threads (``ModelPlugin.share_cores``), and scores the same as it would on one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scoring.engine import ScoreJob, dask_client, run_shards
from scoring.inputs import inspect_input
from scoring.shards import plan_shards
from scoring.spec import read_model_spec
from tests.conftest import KEY, N_FEATURES
from tests.integration.test_scoring_failures import write_input

pytestmark = [pytest.mark.slow]


def mlp_model(folder: Path) -> Path:
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from batchscore.samples import feature_names
    from scoring.reference import MLP

    torch.manual_seed(0)
    path = folder / "mlp"
    mlflow.pytorch.save_model(
        MLP(N_FEATURES, hidden=(64, 64), sigmoid=True).eval(),
        str(path),
        signature=ModelSignature(
            inputs=Schema([ColSpec("float", n) for n in feature_names(N_FEATURES)]),
            outputs=Schema([ColSpec("float", "p")]),
        ),
        serialization_format="pickle",
        pip_requirements=["torch"],
    )
    return path


def score_one_shard(tmp_path: Path, threads: int, name: str) -> tuple[int, dict[int, float]]:
    """One shard of 40,000 rows on an in-process cluster of ``threads`` threads: the most
    torch threads it had, and its predictions by key."""
    data = tmp_path / "in"
    if not data.exists():
        write_input(data, files=1, rows=40_000, group=40_000)
    model_dir = tmp_path / "mlp" if (tmp_path / "mlp").exists() else mlp_model(tmp_path)
    spec = read_model_spec(model_dir)
    (shard,) = plan_shards(inspect_input(data, spec.features, KEY).files, 1_000_000)
    parts = tmp_path / name
    job = ScoreJob(
        run_id=name,
        model_dir=str(model_dir),
        model_name="mlp",
        model_version="1",
        spec=spec,
        key_column=KEY,
        parts_dir=str(parts),
        batch_size=0,
        device="cpu",
    )
    with dask_client("local", threads, 1) as client:
        (result,), errors = run_shards(client, [shard], job)
    assert errors == {}
    table = pq.read_table(parts / shard.part_name)
    scores = dict(zip(table.column(KEY).to_pylist(), table.column("p").to_pylist(), strict=True))
    return result.threads, scores


def test_a_shard_scored_alone_uses_the_idle_threads_cores(tmp_path: Path) -> None:
    alone_on_two, on_two = score_one_shard(tmp_path, 2, "two-threads")
    alone_on_one, on_one = score_one_shard(tmp_path, 1, "one-thread")
    assert alone_on_two == 2  # the worker's other thread had nothing to score
    assert alone_on_one == 1
    assert on_two.keys() == on_one.keys() and len(on_two) == 40_000
    keys = sorted(on_two)
    np.testing.assert_allclose(
        [on_two[k] for k in keys], [on_one[k] for k in keys], rtol=1e-5, atol=1e-6
    )
