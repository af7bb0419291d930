"""Quality gates end to end: input checks fail fast, the drift gate guards the live version."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from batchscore.core.settings import RunSettings, load_settings
from jobs import steps
from jobs.manifest import Manifest, load_manifest
from kv_export.store import open_store
from scoring.errors import BadColumnType, DriftDetected, TooManyNulls
from tests.conftest import KEY, N_FEATURES, Registry, run_cli, run_job
from tests.integration.test_bad_input import attempt, write
from tests.integration.test_pipeline import SAMPLE, lookup

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
OUTPUT = "churn_probability"


# --- input checks: footers only, nothing scored -------------------------------------------


def test_feature_null_rate_above_the_bound(env: dict[str, str], tmp_path: Path) -> None:
    values = np.ones(200, dtype=np.float32)
    values[:10] = np.nan
    import pyarrow as pa

    column = pa.array(values, mask=np.isnan(values))  # 10 nulls of 200: 5%
    path = write(tmp_path / "in", f04=column)
    error = attempt(tmp_path / "in")
    assert isinstance(error, TooManyNulls)
    message = str(error)
    assert "'f04' is 5.00% null (10 of 200 rows)" in message and str(path) in message
    assert "at most 0.00%" in message and "BATCHSCORE_MAX_FEATURE_NULL_RATE" in message
    assert not list((load_settings(RunSettings).runs_dir / "bad").glob("*/parts/*.parquet"))


def test_null_rate_within_a_raised_bound_passes_the_check(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa

    values = np.ones(200, dtype=np.float32)
    write(tmp_path / "in", f04=pa.array(values, mask=np.arange(200) < 10))
    monkeypatch.setenv("BATCHSCORE_MAX_FEATURE_NULL_RATE", "0.1")
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings, input_path=str(tmp_path / "in"), model_uri="models:/churn/1", key_column=KEY
    )
    ref = steps.resolve(settings, params)
    assert steps.plan(ref["run_dir"])["rows"] == 200


def test_int64_feature_beyond_float32_precision(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path / "in", f01=np.arange(200, dtype=np.int64) + 2**24 - 100)
    error = attempt(tmp_path / "in")
    assert isinstance(error, BadColumnType)
    message = str(error)
    assert "'f01' has type int64" in message and str(path) in message
    assert "float32 cannot hold exactly" in message and "±1.67772e+07" in message
    assert f"max {float(2**24 + 99)}" in message


def test_float64_feature_beyond_float32_range(env: dict[str, str], tmp_path: Path) -> None:
    values = np.zeros(200)
    values[7] = 1e39
    error = attempt(write(tmp_path / "in", f02=values).parent)
    assert isinstance(error, BadColumnType)
    assert "'f02' has type double" in str(error) and "max 1e+39" in str(error)


def test_small_integers_and_float64_in_range_are_accepted(
    env: dict[str, str], tmp_path: Path
) -> None:
    write(
        tmp_path / "in",
        f01=np.arange(200, dtype=np.int64),
        f02=np.linspace(-1, 1, 200),  # float64
        f03=np.arange(200, dtype=np.int16),
    )
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings, input_path=str(tmp_path / "in"), model_uri="models:/churn/1", key_column=KEY
    )
    assert steps.plan(steps.resolve(settings, params)["run_dir"])["rows"] == 200


# --- the drift gate ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(registry: Registry) -> dict[str, str]:
    """churn v1 with a small weight change, and with its final layer shifted hard.

    Scaling the final weights before shifting the bias makes the shift independent of
    how sharp the session's churn v1 came out of its few seconds of training.
    """
    import os

    import mlflow.pytorch
    import torch

    from batchscore.samples import log_and_register

    os.environ["MLFLOW_TRACKING_URI"] = registry.tracking_uri
    base = mlflow.pytorch.load_model("models:/churn/1")
    small, shifted = copy.deepcopy(base), copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in small.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        final = [m for m in shifted.net if isinstance(m, torch.nn.Linear)][-1]
        final.weight.mul_(0.1)  # logits squeezed, then shifted: every output near 0.99
        final.bias.add_(5.0)
    found = {}
    for name, model in (("churn_small", small), ("churn_shifted", shifted)):
        registered = log_and_register(
            model,
            tracking_uri=registry.tracking_uri,
            artifact_root=registry.artifact_root,
            name=name,
            n_features=N_FEATURES,
            alias=None,
        )
        found[name] = registered.uri
    return found


def run(dataset: Path, model: str, namespace: str = "drift", force: bool = False) -> Manifest:
    return run_job(dataset, model, namespace, force=force)


def live_version(namespace: str) -> int | None:
    return open_store(load_settings(RunSettings).resolved_store_url).state(namespace).live


def test_a_small_weight_change_publishes_under_tight_thresholds(
    env: dict[str, str],
    dataset: Path,
    variants: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "quality.yaml"
    config.write_text(
        "namespaces:\n  drift:\n    drift: {metric: psi, max_distance: 0.1, moved_delta: 0.05, "
        "max_moved_share: 0.05}\n"
    )
    monkeypatch.setenv("BATCHSCORE_QUALITY_CONFIG", str(config))
    first = run(dataset, "models:/churn/1")
    assert first.published and first.drift is not None and first.drift["compared"] is False
    second = run(dataset, variants["churn_small"])
    assert second.published and live_version("drift") == second.version
    drift = second.drift
    assert drift is not None and drift["compared"] and drift["passed"]
    assert drift["live_version"] == first.version and drift["rules"]["max_distance"] == 0.1
    (row,) = drift["outputs"]
    assert row["output"] == OUTPUT and row["joined_keys"] == 12_000
    assert row["distance"] < 0.1 and row["moved_share"] < 0.05
    # Reports: Data Docs and the live-vs-new plot, linked from the manifest.
    index = Path(second.reports["data_docs"])
    assert index.name == "index.html" and index.is_relative_to(second.run_dir)
    assert "batchscore-output" in index.read_text() or (index.parent / "validations").is_dir()
    png = Path(second.reports["distributions_png"])
    assert png.read_bytes()[:4] == b"\x89PNG" and png.is_relative_to(second.run_dir)


def test_a_hard_shift_is_blocked_and_force_publishes_it(
    env: dict[str, str],
    dataset: Path,
    variants: dict[str, str],
    tmp_path: Path,
    registry: Registry,
) -> None:
    live = run(dataset, "models:/churn/1")
    settings = load_settings(RunSettings)
    before = open_store(settings.resolved_store_url).state("drift")

    with pytest.raises(DriftDetected) as caught:
        run(dataset, variants["churn_shifted"])
    message = str(caught.value)
    assert f"drifted from live version {live.version} of namespace 'drift'" in message
    found = re.search(rf"output '{OUTPUT}': KS (\d\.\d+) \(max 0\.5\)", message)
    assert found and float(found.group(1)) > 0.5, message
    assert "moved by more than 0.5 (max 25.0%)" in message
    assert "--force" in message
    after = open_store(settings.resolved_store_url).state("drift")
    assert after.live == live.version and after.versions.keys() == before.versions.keys()
    blocked = next(
        load_manifest(p.parent)
        for p in (settings.runs_dir / "drift").glob("*/manifest.json")
        if p.parent.name != live.run_id
    )
    assert blocked.drift is not None and not blocked.drift["passed"]
    assert blocked.drift["outputs"][0]["moved_share"] > 0.25 and not blocked.published
    assert all(Path(s.part).exists() for s in blocked.shards), "output stays for inspection"
    # Its MLflow run is FAILED with the gate's error and the distance that blocked it.
    recorded = MlflowClient(registry.tracking_uri).get_run(str(blocked.mlflow_run_id))
    assert recorded.info.status == "FAILED"
    assert recorded.data.tags["batchscore.error"].startswith("DriftDetected: ")
    assert recorded.data.metrics[f"drift.{OUTPUT}.distance"] == pytest.approx(
        blocked.drift["outputs"][0]["distance"]
    )
    assert recorded.data.metrics["drift.passed"] == 0.0
    # The live version keeps serving the old model's values for every key looked up.
    info, values = lookup(settings.resolved_store_url, "drift", SAMPLE)
    assert info.model_name == "churn" and info.run_id == live.run_id
    old = pq.read_table(live.shards[0].part).to_pandas().set_index(KEY)[OUTPUT]
    shifted = pq.read_table(blocked.shards[0].part).to_pandas().set_index(KEY)[OUTPUT]
    key = int(old.index[0])
    (served,) = lookup(settings.resolved_store_url, "drift", [key])[1]
    assert served is not None and served[OUTPUT] == pytest.approx(float(old[key]))
    assert abs(float(shifted[key]) - float(old[key])) > 1e-3

    summary_path = tmp_path / "summary.json"
    forced = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        variants["churn_shifted"],
        "--key-column",
        KEY,
        "--namespace",
        "drift",
        "--force",
        "--summary-json",
        str(summary_path),
        env=env,
    )
    assert forced.returncode == 0, forced.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["published"] and summary["drift"]["overridden"] is True
    assert summary["drift"]["passed"] is False
    assert summary["steps"]["drift"]["overridden"] is True
    assert open_store(settings.resolved_store_url).state("drift").live == summary["version"]
    screen = " ".join(forced.stdout.split())
    assert "FORCED" in screen and "data_docs: file://" in screen, forced.stdout
    assert "distributions_png: file://" in screen
    manifest = load_manifest(summary["run_dir"])
    assert manifest.drift is not None and manifest.drift["overridden"]
    assert Path(manifest.reports["data_docs"]).exists()


def test_a_dag_run_blocked_by_the_drift_gate_still_gets_its_data_docs(
    env: dict[str, str], dataset: Path, variants: dict[str, str]
) -> None:
    """The DAG's validate task leaves a passing verdict's Data Docs to the reports task;
    when its drift gate then blocks the run, no task follows, so it builds them itself
    before it fails, and draws the drift plot its error names."""
    from jobs import data_docs, flow

    run(dataset, "models:/churn/1", namespace="drift-docs")
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri=variants["churn_shifted"],
        key_column=KEY,
        namespace="drift-docs",
    )
    run_dir = flow.start_run(settings, params)["run_dir"]
    flow.plan(run_dir)
    flow.score(run_dir)
    with pytest.raises(DriftDetected):
        flow.validate_and_gate(run_dir, docs_later=True)
    blocked = load_manifest(run_dir)
    step = blocked.steps["validate"]
    assert step["success"] and step["docs_built_on"].endswith("of the validate step")
    assert step["docs_seconds"] > 0 and "docs_error" not in step
    assert Path(blocked.reports["data_docs"]).is_file() and run_dir not in data_docs._builds
    assert blocked.drift is not None and not blocked.drift["passed"] and not blocked.published
    assert Path(blocked.reports["distributions_png"]).is_file()
    assert "plot_job" not in blocked.steps["drift"]
