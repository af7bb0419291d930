"""The command line's conventions, through the real ``batchscore`` script: --version, -o
json|table on every read command, exit codes by kind, JSON logs, ``run -f`` and the steps
``resolve`` and ``drift`` (issue 19)."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batchscore.testing import free_port
from jobs.manifest import load_manifest, safe_run_id
from tests.conftest import KEY, run_cli
from tests.integration.test_bad_input import write
from tests.integration.test_quality_gates import variants  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STEP_MESSAGES = (
    "resolved ",
    "planned ",
    "scoring ",
    "validation report",
    "drift plot",
    "exported ",
)


def cli_json(*args: str, env: dict[str, str]) -> dict[str, object]:
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = json.loads(done.stdout)
    return document


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_version_and_usage_errors(env: dict[str, str]) -> None:
    shown = run_cli("--version", env=env)
    assert shown.returncode == 0 and shown.stdout.strip() == f"batchscore {version('batchscore')}"
    for args in (
        ["run", "--no-such-option"],
        ["status", "ns", "-o", "yaml"],
        ["run", "--device", "tpu", "--input", "x", "--model", "models:/m/1", "--key-column", "k"],
        ["run", "--cluster", "somewhere", "--input", "x"],
        ["run", "--input", "x"],  # --model and --key-column missing, and no -f
        ["run", "--date", "2026-11-20", "--input", "x", "--model", "models:/m/1"],  # no -f
    ):
        done = run_cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
    helped = " ".join(run_cli("--help", env=env).stdout.split())
    assert "Exit codes: 0 ok;" in helped and "5 unavailable: the store" in helped


def test_exit_codes_of_bad_input_and_an_unreachable_store(
    env: dict[str, str], tmp_path: Path
) -> None:
    missing = run_cli(
        *("run", "--input", str(tmp_path / "nowhere"), "--model", "models:/churn@champion"),
        *("--key-column", KEY),
        env=env,
    )
    assert missing.returncode == 3, missing.stderr
    assert missing.stderr.strip().startswith("error: Input path") and "nowhere" in missing.stderr
    no_model = run_cli("model", "list", "no_such_model", env=env)
    assert no_model.returncode == 3 and "does not exist" in no_model.stderr
    unknown = run_cli("status", "never_written", env=env)
    assert unknown.returncode == 3 and "holds no namespace 'never_written'" in unknown.stderr

    down = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["status", "ns", "--store", down], ["versions", "ns", "--store", down]):
        done = run_cli(*args, env=env)
        assert done.returncode == 5, (args, done.stderr)
        assert done.stderr.count("error: ") == 1 and "did not answer" in done.stderr
    gated = run_cli(
        *("run", "--input", str(tmp_path / "nowhere"), "--model", "models:/churn@champion"),
        *("--key-column", KEY, "--store", down),
        env=env,
    )
    assert gated.returncode == 5, gated.stderr


def test_a_quality_gate_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    values = np.ones(200, dtype=np.float32)
    write(tmp_path / "in", f04=pa.array(values, mask=np.arange(200) < 10))  # 5% null
    done = run_cli(
        *("run", "--input", str(tmp_path / "in"), "--model", "models:/churn@champion"),
        *("--key-column", KEY, "--namespace", "nulls"),
        env=env,
    )
    assert done.returncode == 4, done.stderr
    assert "'f04' is 5.00% null" in " ".join(done.stderr.split())


def test_json_logs_read_commands_and_the_drift_step(
    env: dict[str, str],
    dataset: Path,
    variants: dict[str, str],  # noqa: F811
) -> None:
    """A whole run with JSON logs and the in-process cluster's dashboard asked for
    (``--dashboard``); then every read command in both formats; then a candidate that
    moved far, run step by step with the default (no dashboard): resolve, plan, score,
    drift (exit 4)."""
    done = run_cli(
        *("run", "--input", str(dataset), "--model", "models:/churn/1", "--key-column", KEY),
        *("--namespace", "conv", "--dashboard"),
        env=env | {"BATCHSCORE_LOG_FORMAT": "json"},
    )
    assert done.returncode == 0, done.stderr
    not_json = [line for line in done.stderr.splitlines() if not is_json_object(line)]
    assert not_json == []
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    messages = [line["message"] for line in lines]
    for start in STEP_MESSAGES:
        assert any(m.startswith(start) for m in messages), (start, messages)
    assert any("dashboard: http" in m for m in messages), messages
    assert "published" in done.stdout

    status = cli_json("status", "conv", "-o", "json", env=env)
    assert status["live"] == 1 and status["namespace"] == "conv"
    assert cli_json("status", "conv", "--json", env=env) == status  # the old flag still works
    listed = cli_json("versions", "conv", "-o", "json", env=env)
    assert listed["live"] == 1 and "1" in listed["versions"]  # type: ignore[operator]
    collected = cli_json("gc", "conv", "--dry-run", "--keep", "1", "-o", "json", env=env)
    assert collected == {
        "namespace": "conv",
        "store": status["store"],
        "dry_run": True,
        "keep": 1,
        "live": 1,
        "versions": [],
    }
    models = cli_json("model", "list", "churn", "-o", "json", env=env)
    (churn,) = models["models"]  # type: ignore[misc]
    assert churn["name"] == "churn" and [v["version"] for v in churn["versions"]] == ["1", "2"]
    for args in (["status", "conv"], ["versions", "conv"], ["gc", "conv", "--dry-run"]):
        table = run_cli(*args, "-o", "table", env=env)
        assert table.returncode == 0 and "conv" in table.stdout and "{" not in table.stdout

    started = cli_json(
        *("step", "resolve", "--input", str(dataset), "--model", variants["churn_shifted"]),
        *("--key-column", KEY, "--namespace", "conv"),
        env=env,
    )
    run_dir = str(started["run_dir"])
    assert Path(run_dir, "manifest.json").is_file() and started["shadow"] is None
    assert run_cli("step", "plan", run_dir, env=env).returncode == 0
    scored = run_cli("step", "score", run_dir, env=env)
    assert scored.returncode == 0, scored.stderr
    assert "dashboard: off" in " ".join(scored.stderr.split()), scored.stderr
    drifted = run_cli("step", "drift", run_dir, env=env)
    assert drifted.returncode == 4, drifted.stderr
    assert "drifted from live version 1 of namespace 'conv'" in " ".join(drifted.stderr.split())
    manifest = load_manifest(run_dir)
    assert manifest.drift is not None and not manifest.drift["passed"] and not manifest.published
    # The in-process cluster has no dashboard unless asked for: none logged, none recorded.
    assert manifest.params.dashboard is None and manifest.summary()["dashboard"] is None


def test_run_replays_a_job_config_for_a_date(
    env: dict[str, str], dataset: Path, tmp_path: Path
) -> None:
    job = tmp_path / "jobs" / "conv_job.yaml"
    job.parent.mkdir()
    job.write_text(
        "name: conv_job\n"
        "namespace: conv_job\n"
        "model_uri: models:/churn@champion\n"
        f"input_path: {dataset}/dt={{{{ ds }}}}\n"
        f"key_column: {KEY}\n"
        "schedule: null\n"
    )
    # The dashboard by setting (BATCHSCORE_DASHBOARD), for the in-process cluster.
    done = run_cli(
        "run", "-f", str(job), "--date", "2026-11-20", env=env | {"BATCHSCORE_DASHBOARD": "true"}
    )
    assert done.returncode == 0, done.stderr
    run_dir = Path(env["BATCHSCORE_HOME"]) / "runs" / "conv_job"
    (folder,) = run_dir.iterdir()
    assert folder.name == safe_run_id("score_conv_job__2026-11-20T00:00:00+00:00")
    manifest = load_manifest(folder)
    assert manifest.params.input_path == f"{dataset}/dt=2026-11-20"
    assert manifest.params.data_as_of == "2026-11-20T00:00:00+00:00"
    assert manifest.published and manifest.summary()["rows"] == 4_000
    # The Dask dashboard, on a line of its own as soon as the cluster is up, and recorded.
    assert manifest.params.dashboard is True
    dashboard = manifest.summary()["dashboard"]
    assert dashboard and dashboard.startswith("http://")
    assert f"Dask dashboard: {dashboard}" in done.stderr.splitlines()

    again = run_cli("run", "-f", str(job), "--date", "2026-11-20", env=env)
    assert again.returncode == 0 and [p.name for p in run_dir.iterdir()] == [folder.name]

    job.write_text(job.read_text() + "no_such_field: 1\n")
    refused = run_cli("run", "-f", str(job), env=env)
    assert refused.returncode == 3 and "no_such_field" in refused.stderr


def test_model_list_pages_through_every_model(tmp_path: Path, env: dict[str, str]) -> None:
    """More models than MLflow answers in one page (100)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'many.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    names = sorted(f"model_{i:03d}" for i in range(105))
    for name in names:
        client.create_registered_model(name)
    listed = cli_json("model", "list", "-o", "json", env=env | {"MLFLOW_TRACKING_URI": uri})
    assert [m["name"] for m in listed["models"]] == names  # type: ignore[attr-defined]
