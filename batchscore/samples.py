"""Synthetic data and small registered models: for the demo, the tests and the benchmarks.

Nothing is downloaded: the model is trained for a few seconds on data made
here, logged to MLflow with a signature and registered under an alias.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def feature_names(n_features: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n_features)]


def make_dataset(
    folder: Path,
    *,
    rows: int,
    files: int = 4,
    row_group_rows: int = 50_000,
    n_features: int = 48,
    key_column: str = "customer_id",
    partitioned: bool = True,
    seed: int = 7,
    key_offset: int = 1_000_000,
) -> list[Path]:
    """Write ``rows`` rows over ``files`` Parquet files, several row groups each.

    Keys are unique integers in shuffled order; feature columns are float32 and
    stored in a shuffled column order among other, non-feature columns, so a
    scorer must find features by name.
    """
    rng = np.random.default_rng(seed)
    keys = rng.permutation(rows).astype(np.int64) + key_offset
    names = feature_names(n_features)
    column_order = [key_column, "segment", *names, "signup_days"]
    rng.shuffle(column_order)
    written = []
    for index, chunk in enumerate(np.array_split(np.arange(rows), files)):
        n = len(chunk)
        data = rng.standard_normal((n, n_features), dtype=np.float32)
        columns: dict[str, np.ndarray] = {name: data[:, j] for j, name in enumerate(names)}
        columns[key_column] = keys[chunk]
        columns["segment"] = np.array(["consumer", "smb", "enterprise"])[rng.integers(0, 3, n)]
        columns["signup_days"] = rng.integers(0, 3000, n).astype(np.int32)
        table = pa.table({name: columns[name] for name in column_order})
        target = folder / (f"dt=2026-11-{20 + index % 3:02d}" if partitioned else "")
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"part-{index:04d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_rows)
        written.append(path)
    return written


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    uri: str


def train_model(n_features: int = 48, seconds: float = 3.0, seed: int = 0) -> object:
    """Fit an MLP to a synthetic churn target for about ``seconds`` seconds."""
    import torch

    from scoring.reference import MLP

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    true_weights = rng.standard_normal(n_features).astype(np.float32) / np.sqrt(n_features)
    x = rng.standard_normal((20_000, n_features), dtype=np.float32)
    y = (x @ true_weights + 0.3 * rng.standard_normal(len(x)) > 0).astype(np.float32)
    model = MLP(n_features, hidden=(64,), n_outputs=1, sigmoid=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCELoss()
    features, target = torch.from_numpy(x), torch.from_numpy(y).reshape(-1, 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for start in range(0, len(features), 2048):
            optimiser.zero_grad()
            loss = loss_fn(model(features[start : start + 2048]), target[start : start + 2048])
            loss.backward()
            optimiser.step()
    return model.eval()


def log_and_register(
    model: object,
    *,
    tracking_uri: str,
    artifact_root: Path,
    name: str,
    registry_uri: str | None = None,
    n_features: int,
    serialization: Literal["pickle", "pt2"] = "pickle",
    alias: str | None = "champion",
    output_name: str = "churn_probability",
) -> RegisteredModel:
    """Log with a signature (columns for pickle, tensor for pt2), register, set the alias.

    Registered in ``registry_uri`` when the registry is not the tracking store
    (``MLFLOW_REGISTRY_URI``), where runs will resolve it.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    mlflow.set_tracking_uri(tracking_uri)
    if registry_uri is not None:  # (MLflow writes it into os.environ: only when given)
        mlflow.set_registry_uri(registry_uri)
    experiment = "batchscore"
    if mlflow.get_experiment_by_name(experiment) is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(experiment, artifact_location=artifact_root.absolute().as_uri())
    mlflow.set_experiment(experiment)
    if serialization == "pt2":
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_features))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
        )
        example = np.zeros((4, n_features), dtype=np.float32)
    else:
        signature = ModelSignature(
            inputs=Schema([ColSpec("float", n) for n in feature_names(n_features)]),
            outputs=Schema([ColSpec("float", output_name)]),
        )
        example = None
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            serialization_format=serialization,
            registered_model_name=name,
            # Given, not inferred: inferring them starts a subprocess that imports torch
            # and the model, for a list that is known here already.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    client = mlflow.MlflowClient(
        tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri
    )
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return RegisteredModel(name=name, version=version, uri=f"models:/{name}/{version}")
