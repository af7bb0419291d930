"""`batchscore model register|promote|list` against a real MLflow tracking store."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscore.samples import feature_names
from scoring.reference import MLP
from tests.conftest import N_FEATURES, Registry, run_cli


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
    assert missing.returncode == 1 and "has no version 9" in missing.stderr
    not_a_model = run_cli("model", "register", str(tmp_path), "--name", "x", env=env)
    assert not_a_model.returncode == 1 and "not an MLflow model folder" in not_a_model.stderr
