"""What each of the DAG's tasks imports: every task is a process of its own, and an import
it does not need (MLflow, torch: seconds each) is paid on every run.

The steps run as the DAG's tasks call them (``jobs.flow``), each in a fresh Python
process, on a real run (a real MLflow registry, Dask, the embedded store). Resolve
needs MLflow (it pins the model) but not torch (it reads and checks the model's spec:
``scoring.spec``), score needs torch (and MLflow to load the model), and publish records
the run's end in MLflow; plan, validate and export need neither.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobs.manifest import load_manifest
from tests.conftest import BIN, KEY, Registry, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HEAVY = ("mlflow", "torch", "great_expectations", "distributed")

TASK = """
import json, sys
from jobs import flow
getattr(flow, sys.argv[1])(sys.argv[2])
print(json.dumps([m for m in sys.argv[3].split(",") if m in sys.modules]))
"""


# The DAG's resolve task: jobs.flow.start_run with the run's parameters (resolve_run)
RESOLVE = """
import json, sys
from batchscore.core.settings import RunSettings, load_settings
from jobs import flow, steps
settings = load_settings(RunSettings)
params = steps.make_params(
    settings, input_path=sys.argv[1], model_uri="models:/churn/1", key_column=sys.argv[2],
    namespace=sys.argv[3],
)
started = flow.start_run(settings, params)
print(json.dumps([started["run_dir"], [m for m in sys.argv[4].split(",") if m in sys.modules]]))
"""


def run_task(step: str, run_dir: str, env: dict[str, str]) -> list[str]:
    """Run ``jobs.flow.<step>`` in a fresh process; the heavy modules it imported."""
    found: list[str] = run_python(TASK, [step, run_dir, ",".join(HEAVY)], env)
    return found


def resolve_task(dataset: Path, env: dict[str, str], namespace: str) -> tuple[str, list[str]]:
    """Resolve as the DAG's resolve task does, in a fresh process: the run folder, and the
    heavy modules it imported."""
    run_dir, imported = run_python(RESOLVE, [str(dataset), KEY, namespace, ",".join(HEAVY)], env)
    return str(run_dir), list(imported)


def run_python(code: str, args: list[str], env: dict[str, str]) -> Any:
    """``code`` in a fresh Python process; the JSON of the last line it printed."""
    done = subprocess.run(
        [str(BIN / "python"), "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve(dataset: Path, env: dict[str, str], namespace: str) -> str:
    started = run_cli(
        "step", "resolve", "--input", str(dataset), "--model", "models:/churn/1",
        "--key-column", KEY, "--namespace", namespace, env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-4000:]
    return str(json.loads(started.stdout[started.stdout.index("{") :])["run_dir"])


def test_each_task_imports_only_the_heavy_modules_it_needs(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    run_dir, resolved = resolve_task(dataset, env, "imports")
    assert resolved == ["mlflow"]
    assert load_manifest(run_dir).model.feature_types, "resolve recorded no feature types"
    # a retried resolve finds the run folder and checks the pinned model's trust again
    again, retried = resolve_task(dataset, env, "imports")
    assert again == run_dir and "torch" not in retried

    imported = {
        step: run_task(step, run_dir, env)
        for step in ("plan", "score", "validate_and_gate", "export_and_compare", "publish_run")
    }
    assert imported["plan"] == []
    assert {"torch", "distributed"} <= set(imported["score"])
    # the Data Docs are built by a process of their own: GX stays out of the task too
    assert imported["validate_and_gate"] == []
    assert imported["export_and_compare"] == []
    assert "torch" not in imported["publish_run"]

    manifest = load_manifest(run_dir)
    assert manifest.published and manifest.steps["plan"]["rows"] == 12_000
    assert Path(manifest.reports["data_docs"]).is_file()


def test_a_run_resolved_before_feature_types_were_recorded_still_plans(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    """A run folder from an earlier release (its manifest has no feature types) is
    planned as before: the types come from the model's MLmodel."""
    run_dir = resolve(dataset, env, "older")
    path = Path(run_dir) / "manifest.json"
    record = json.loads(path.read_text())
    del record["model"]["feature_types"]
    path.write_text(json.dumps(record))
    assert load_manifest(run_dir).model.feature_types is None

    assert "mlflow" in run_task("plan", run_dir, env)
    manifest = load_manifest(run_dir)
    assert manifest.steps["plan"]["rows"] == 12_000 and len(manifest.shards) == 6
