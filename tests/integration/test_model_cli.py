"""`batchscore model register|promote|list` against a real MLflow tracking store: SQLite,
and `mlflow server` on Postgres as docker-compose.yaml runs it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchscore.samples import feature_names, train_model
from scoring.reference import MLP
from tests.conftest import N_FEATURES, Registry, run_cli
from tests.stack import Deployment, deploy, save_model_folder


def saved_model(folder: Path) -> Path:
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("float", n) for n in feature_names(N_FEATURES)]),
        outputs=Schema([ColSpec("float", "p")]),
    )
    path = folder / "my-model"
    mlflow.pytorch.save_model(
        MLP(N_FEATURES).eval(),
        str(path),
        signature=signature,
        serialization_format="pickle",
        pip_requirements=["torch"],
    )
    return path


@pytest.mark.slow
def test_register_promote_and_list(env: dict[str, str], registry: Registry, tmp_path: Path) -> None:
    model = saved_model(tmp_path)
    first = run_cli(
        "model", "register", str(model), "--name", "cli_model", "--alias", "champion", env=env
    )
    assert first.returncode == 0, first.stderr
    assert "registered cli_model version 1" in first.stdout and "champion" in first.stdout
    second = run_cli("model", "register", str(model), "--name", "cli_model", env=env)
    assert "version 2" in second.stdout, second.stderr

    promoted = run_cli("model", "promote", "cli_model", "2", "--alias", "champion", env=env)
    assert promoted.returncode == 0 and "cli_model@champion → version 2" in promoted.stdout

    listed = run_cli("model", "list", "cli_model", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "cli_model" in line and "│" in line]
    assert len(lines) == 2 and "champion" in lines[1] and "champion" not in lines[0]

    missing = run_cli("model", "promote", "cli_model", "9", env=env)
    assert missing.returncode == 3 and "has no version 9" in missing.stderr  # bad input
    not_a_model = run_cli("model", "register", str(tmp_path), "--name", "x", env=env)
    assert not_a_model.returncode == 3 and "not an MLflow model folder" in not_a_model.stderr


def registered_forward(tracking_uri: str, uri: str, destination: Path) -> np.ndarray:
    """Download the registered version as a run does, load it, score three rows."""
    import mlflow.pytorch
    import torch

    from registry.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry(tracking_uri)
    local = registry.download(registry.resolve(uri), destination)
    model = mlflow.pytorch.load_model(str(local))
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(ROWS)).numpy())


def register_folder_then_delete_it(
    env: dict[str, str], tmp_path: Path, tracking_uri: str
) -> tuple[str, np.ndarray]:
    """`batchscore model register <folder>`, then the folder is gone; the model's own
    forward pass of ROWS (computed before the folder went)."""
    model = train_model(N_FEATURES, seconds=0.2, seed=5)
    folder = save_model_folder(tmp_path / "user-model", model, N_FEATURES)
    import torch

    with torch.no_grad():
        expected = np.asarray(model(torch.from_numpy(ROWS)).numpy())  # type: ignore[operator]
    env = env | {"MLFLOW_TRACKING_URI": tracking_uri}
    done = run_cli("model", "register", str(folder), "--name", "copied", "--alias", "prod", env=env)
    assert done.returncode == 0, done.stderr
    assert "registered copied version 1" in done.stdout
    shutil.rmtree(folder)
    listed = run_cli("model", "list", "copied", env=env)
    assert listed.returncode == 0, listed.stderr
    assert str(folder) not in listed.stdout.replace("\n", ""), "the source is the user's folder"
    return "models:/copied@prod", expected


ROWS = np.random.default_rng(3).standard_normal((3, N_FEATURES), dtype=np.float32)


@pytest.mark.slow
def test_a_registered_folder_is_copied_into_the_sqlite_stores_artifacts(
    env: dict[str, str], tmp_path: Path
) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'own' / 'mlflow.db'}"
    (tmp_path / "own").mkdir()
    uri, expected = register_folder_then_delete_it(env, tmp_path, tracking_uri)
    assert (tmp_path / "own" / "mlartifacts").is_dir(), "artifacts not beside the database"
    found = registered_forward(tracking_uri, uri, tmp_path / "download")
    np.testing.assert_allclose(found, expected, rtol=1e-6)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Deployment]:
    """docker-compose.yaml's mlflow service on the machine's Postgres (see tests/stack.py)."""
    deployment = deploy(tmp_path / "stack", tmp_path / "data", services=("postgres", "mlflow"))
    yield deployment
    deployment.stop()


@pytest.mark.slow
def test_register_a_folder_through_a_tracking_server_on_postgres(
    env: dict[str, str], tmp_path: Path, mlflow_server: Deployment
) -> None:
    """The compose header's `batchscore model register <folder>` against `mlflow server`:
    the server refuses a local source, so the folder goes into its artifact store."""
    with mlflow_server.stack.report_failure():
        server = mlflow_server.tracking_uri
        uri, expected = register_folder_then_delete_it(env, tmp_path, server)
        promoted = run_cli(
            "model", "promote", "copied", "1", "--alias", "champion",
            env=env | {"MLFLOW_TRACKING_URI": server},
        )  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        found = registered_forward(server, "models:/copied@champion", tmp_path / "download")
        np.testing.assert_allclose(found, expected, rtol=1e-6)
        stored = list((tmp_path / "stack" / "mlartifacts").rglob("MLmodel"))
        assert stored, "the model is not in the server's --artifacts-destination"
