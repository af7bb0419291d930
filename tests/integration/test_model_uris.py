"""Runs pinned from each model URI form MLflow takes, against the real SQLite registry.

Each run scores and publishes what the model the URI names computes; its manifest
records a concrete pin (a version, a logged model's id, a run's id), never the alias
or ``latest``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from batchscore.core.settings import RunSettings, load_settings
from registry.mlflow_registry import MlflowRegistry
from tests.conftest import Registry, run_job
from tests.integration.test_pipeline import check_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def churn_version(registry: Registry, version: str) -> tuple[str, str]:
    """The logged model id and the run id behind a registered churn version."""
    found = MlflowClient(registry.tracking_uri, registry.tracking_uri).get_model_version(
        "churn", version
    )
    # SQLite's registry leaves model_id empty; the version's source names the logged model.
    model_id = found.model_id or found.source.removeprefix("models:/")
    assert model_id.startswith("m-") and found.run_id
    return model_id, found.run_id


def test_latest_pins_the_highest_version(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    manifest = run_job(dataset, "models:/churn/latest", "latest")
    assert (manifest.model.source, manifest.model.version) == ("registry", "2")
    assert manifest.model.uri == "models:/churn/2"
    assert manifest.model.requested == "models:/churn/latest"
    store = load_settings(RunSettings).resolved_store_url
    check_run(store, manifest.summary(), registry, dataset, "models:/churn/2")


def test_a_logged_model_id_pins_that_model(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    model_id, run_id = churn_version(registry, "1")
    manifest = run_job(dataset, f"models:/{model_id}", "logged")
    assert (manifest.model.source, manifest.model.version) == ("logged_model", model_id)
    assert manifest.model.uri == f"models:/{model_id}"
    assert manifest.model.source_run_id == run_id
    store = load_settings(RunSettings).resolved_store_url
    check_run(store, manifest.summary(), registry, dataset, "models:/churn/1")


def test_a_run_folder_pins_the_run(env: dict[str, str], registry: Registry, dataset: Path) -> None:
    _, run_id = churn_version(registry, "2")
    manifest = run_job(dataset, f"runs:/{run_id}/model", "fromrun")
    assert (manifest.model.source, manifest.model.version) == ("run", run_id)
    assert manifest.model.uri == f"runs:/{run_id}/model"
    assert manifest.model.name == "model"
    store = load_settings(RunSettings).resolved_store_url
    check_run(store, manifest.summary(), registry, dataset, "models:/churn/2")


def test_a_registry_apart_from_the_tracking_store(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLFLOW_REGISTRY_URI: names and aliases there, the model's files in the tracking store."""
    apart = f"sqlite:///{tmp_path / 'registry.db'}"
    _, run_id = churn_version(registry, "2")
    elsewhere = MlflowRegistry(registry.tracking_uri, registry_uri=apart)
    elsewhere.register(f"runs:/{run_id}/model", "apart", alias="champion")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", apart)
    manifest = run_job(dataset, "models:/apart@champion", "apart")
    assert (manifest.model.name, manifest.model.version) == ("apart", "1")
    store = load_settings(RunSettings).resolved_store_url
    check_run(store, manifest.summary(), registry, dataset, "models:/churn/2")
    # The tracking store's own registry has no such model.
    assert not MlflowClient(registry.tracking_uri, registry.tracking_uri).search_registered_models(
        "name='apart'"
    )
