"""Hostile input at every edge: namespaces that escape folders, and untrusted model files.

Each edge (the CLI, the pipeline, the stores) refuses a namespace outside the one rule
of ``batchscore.names`` with a message that names the field and the rule, before
anything is written. A pickled model loads only while ``BATCHSCORE_ALLOW_PICKLE``
allows it, and the refusal comes before any worker could unpickle it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchscore.errors import BatchscoreError
from batchscore.samples import feature_names
from batchscore.settings import RunSettings, load_settings
from jobs import steps
from kv_export.store import open_store
from tests.conftest import KEY, N_FEATURES, Registry, new_version

RULE = "1-128 characters of A-Z a-z 0-9 . _ -"


def hostile(tmp_path: Path) -> list[str]:
    """Namespaces every edge refuses: ``/abs`` points into the test's own folder, so the
    test can see that nothing was created there."""
    return ["../../x", str(tmp_path / "abs"), "a b", "..", "", "n" * 129, ".hidden", "a..b"]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


def assert_refused(message: str, field: str) -> None:
    """The message names the field and the rule (rich's panel may wrap it: unwrapped here)."""
    text = " ".join(message.replace("│", " ").split())
    assert field in text and RULE in text, message


@pytest.mark.parametrize(
    "command", ["status", "versions", "rollback", "gc"], ids=lambda c: f"batchscore {c}"
)
def test_cli_commands_refuse_bad_namespaces(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    from batchscore.cli import app

    home = Path(env["BATCHSCORE_HOME"])
    store = f"lmdb://{tmp_path / 'store'}"
    runner = CliRunner()
    for bad in hostile(tmp_path):
        before = files_under(tmp_path)
        done = runner.invoke(app, [command, "--store", store, "--", bad])
        assert done.exit_code == 2, (bad, done.output)
        assert_refused(done.output, "NAMESPACE")
        assert files_under(tmp_path) == before, bad
    assert not home.exists() or files_under(home) == set()


def test_cli_run_refuses_bad_namespaces_before_writing(
    env: dict[str, str], tmp_path: Path, dataset: Path
) -> None:
    from batchscore.cli import app

    runner = CliRunner()
    for bad in hostile(tmp_path):
        before = files_under(tmp_path)
        done = runner.invoke(
            app,
            ["run", "--input", str(dataset), "--model", "models:/churn@champion"]
            + ["--key-column", KEY, f"--namespace={bad}"],
        )
        assert done.exit_code == 2, (bad, done.output)
        assert_refused(done.output, "--namespace")
        assert files_under(tmp_path) == before, bad


def test_pipeline_refuses_bad_namespaces_before_writing(
    env: dict[str, str], tmp_path: Path, dataset: Path
) -> None:
    settings = load_settings(RunSettings)
    for bad in hostile(tmp_path):
        params = steps.make_params(
            settings,
            input_path=str(dataset),
            model_uri="models:/churn@champion",
            key_column=KEY,
            namespace=bad or None,
        )
        if not bad:  # empty means "the model's name", which is valid: nothing to refuse
            continue
        before = files_under(tmp_path)
        with pytest.raises(BatchscoreError) as refused:
            steps.resolve(settings, params, run_id="hostile")
        assert_refused(str(refused.value), "namespace")
        assert files_under(tmp_path) == before, bad


@pytest.fixture(scope="module")
def spaced_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry whose model name has a space: a valid MLflow name, not a valid namespace."""
    from batchscore.samples import log_and_register, train_model

    root = tmp_path_factory.mktemp("spaced")
    found = Registry(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    log_and_register(
        train_model(N_FEATURES, seconds=0.1, seed=5),
        tracking_uri=found.tracking_uri,
        artifact_root=found.artifact_root,
        name="my model",
        n_features=N_FEATURES,
        serialization="pt2",
    )
    return found


@pytest.mark.slow
def test_a_model_name_that_is_no_namespace_needs_namespace(
    env: dict[str, str],
    tmp_path: Path,
    dataset: Path,
    spaced_registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", spaced_registry.tracking_uri)
    settings = load_settings(RunSettings)
    features = feature_names(N_FEATURES)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/my model@champion",
        key_column=KEY,
        features=features,
    )
    with pytest.raises(BatchscoreError) as refused:
        steps.resolve(settings, params)
    message = str(refused.value)
    assert "'my model'" in message and "--namespace" in message and RULE in message
    assert files_under(settings.runs_dir) == set()
    named = params.model_copy(update={"namespace": "my_model"})
    ref = steps.resolve(settings, named)
    assert ref["namespace"] == "my_model" and Path(ref["run_dir"]).parent.name == "my_model"


def test_stores_refuse_bad_namespaces_and_write_no_key(tmp_path: Path) -> None:
    store = open_store(f"lmdb://{tmp_path / 'store'}")
    try:
        for bad in hostile(tmp_path):
            with pytest.raises(BatchscoreError) as refused:
                store.begin_version(bad, new_version("r1", 10))
            assert_refused(str(refused.value), "namespace")
            with pytest.raises(BatchscoreError) as refused:
                store.publish(bad, 1, keep=2)
            assert_refused(str(refused.value), "namespace")
        assert store.namespaces() == []
        assert not (tmp_path / "abs").exists()
    finally:
        store.close()
