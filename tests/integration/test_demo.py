"""`batchscore demo` as a new user runs it (what `make demo` runs), with the model registry
apart from the tracking store (MLFLOW_REGISTRY_URI), as some deployments keep it: the demo
registers its model where its own run resolves it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.airflow]

BIN = Path(sys.executable).parent


def test_the_demo_with_a_registry_apart_from_tracking(tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSCORE_", "MLFLOW_"))}
    env |= {
        "BATCHSCORE_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_REGISTRY_URI": registry,
    }
    done = subprocess.run(
        [str(BIN / "batchscore"), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    registered = MlflowClient(tracking, registry).get_model_version_by_alias("churn", "champion")
    assert str(registered.version) == "1"
    # The tracking store's own registry holds no model: the registry is the other database.
    assert not MlflowClient(tracking, tracking).search_registered_models("name='churn'")
