"""Hostile input at every edge: namespaces that escape folders, and untrusted model files.

Each edge (the CLI, the pipeline, the stores) refuses a namespace outside the one rule
of ``batchscore.core.names`` with a message that names the field and the rule, before
anything is written. A pickled model loads only while ``BATCHSCORE_ALLOW_PICKLE``
allows it, and the refusal comes before any worker could unpickle it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchscore.core.errors import BatchscoreError
from batchscore.core.settings import RunSettings, load_settings
from batchscore.samples import feature_names
from jobs import steps
from kv_export.store import open_store
from tests.conftest import KEY, N_FEATURES, Registry, new_version, run_cli, run_job

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
    import mlflow

    from batchscore.samples import log_and_register, train_model

    root = tmp_path_factory.mktemp("spaced")
    found = Registry(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    # log_model registers in MLflow's process-wide registry, which earlier tests may have
    # pointed elsewhere: point it here while registering, and back afterwards.
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_registry_uri(found.tracking_uri)
    try:
        log_and_register(
            train_model(N_FEATURES, seconds=0.1, seed=5),
            tracking_uri=found.tracking_uri,
            artifact_root=found.artifact_root,
            name="my model",
            n_features=N_FEATURES,
            serialization="pt2",
        )
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
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


# --- the registry is a trust boundary ---------------------------------------------------


def test_pickled_model_refused_when_batchscore_forbids_pickles(
    env: dict[str, str], tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own switch allows pickles (env fixture); batchscore's setting wins."""
    monkeypatch.setenv("BATCHSCORE_ALLOW_PICKLE", "false")
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn@champion",
        key_column=KEY,
        namespace="trusted",
    )
    with pytest.raises(BatchscoreError) as refused:
        steps.resolve(settings, params)
    message = str(refused.value)
    assert "models:/churn/1" in message and "BATCHSCORE_ALLOW_PICKLE" in message
    assert list(settings.runs_dir.rglob("*.parquet")) == []
    assert list(settings.runs_dir.rglob("manifest.json")) == []


def test_a_run_resolved_while_pickles_were_allowed_is_refused_after(
    env: dict[str, str], tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry re-enters resolve with the run folder in place: the setting still decides."""
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn@champion",
        key_column=KEY,
        namespace="retried",
    )
    steps.resolve(settings, params, run_id="retried-run")
    monkeypatch.setenv("BATCHSCORE_ALLOW_PICKLE", "false")
    stricter = load_settings(RunSettings)
    with pytest.raises(BatchscoreError) as refused:
        steps.resolve(stricter, params, run_id="retried-run")
    assert "BATCHSCORE_ALLOW_PICKLE" in str(refused.value)


def test_batchscore_setting_overrides_mlflow_switch_both_ways(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scoring.spec import pickle_allowed

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    assert load_settings(RunSettings).allow_pickle is None
    assert pickle_allowed(load_settings(RunSettings).allow_pickle) is False
    monkeypatch.setenv("BATCHSCORE_ALLOW_PICKLE", "true")
    assert pickle_allowed(load_settings(RunSettings).allow_pickle) is True
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    monkeypatch.setenv("BATCHSCORE_ALLOW_PICKLE", "false")
    assert pickle_allowed(load_settings(RunSettings).allow_pickle) is False


@pytest.mark.slow
@pytest.mark.e2e
def test_pt2_model_runs_with_pickles_forbidden_and_status_shows_serialization(
    env: dict[str, str], tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHSCORE_ALLOW_PICKLE", "false")
    manifest = run_job(
        dataset,
        "models:/churn_pt2@champion",
        "safe",
        features=feature_names(N_FEATURES),
    )
    assert manifest.published and manifest.model.serialization == "pt2"
    assert manifest.summary()["model"]["serialization"] == "pt2"
    shown = run_cli("status", "safe", env=env | {"BATCHSCORE_ALLOW_PICKLE": "false"})
    assert shown.returncode == 0, shown.stderr
    assert "serialization pt2" in shown.stdout
    as_json = run_cli("status", "safe", "--json", env=env)
    assert json.loads(as_json.stdout)["last_run"]["model"]["serialization"] == "pt2"
