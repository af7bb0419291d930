"""What a scoring run logs to its MLflow run, read from its manifest (no MLflow needed)."""

from __future__ import annotations

from pathlib import Path

from batchscore.core.settings import RunSettings
from jobs.manifest import InputRecord, Manifest, ModelRecord, RunParams
from jobs.tracking import experiment_name, run_params, start_tags, step_metrics


def manifest(tmp_path: Path) -> Manifest:
    found = Manifest(
        run_id="run-1",
        namespace="churn",
        run_dir=str(tmp_path),
        params=RunParams(
            input_path="/data/in",
            model_uri="models:/churn@champion",
            key_column="customer_id",
            store_url="redis://cache:6379/0",
            batch_size=0,
            workers=2,
            shard_rows=1000,
        ),
        model=ModelRecord(
            name="churn",
            version="3",
            uri="models:/churn/3",
            requested="models:/churn@champion",
            alias="champion",
            model_id="m-abc",
            source_run_id="r1",
            local_dir=str(tmp_path / "model"),
            flavor="pytorch",
            serialization="pickle",
            signature_kind="columns",
            features=["a"],
            outputs=["p"],
        ),
        input=InputRecord(root="/data/in", fingerprint="f", rows=500, files=1, key_type="int"),
    )
    found.record_step("plan", seconds=0.5, shards=2, rows=500)
    found.record_step("score", seconds=2.0, rows=500, rows_per_second=250.0, note="text")
    found.record_step("validate", seconds=1.0, rows=500, success=True, failed=[])
    found.record_step("drift", seconds=0.25, passed=True, overridden=False)
    found.validation = {"success": True, "outcomes": [{"success": True}, {"success": False}]}
    found.drift = {
        "passed": True,
        "outputs": [{"output": "p", "distance": 0.1, "moved_share": 0.02}],
    }
    return found


def test_each_step_logs_its_seconds_and_numbers(tmp_path: Path) -> None:
    run = manifest(tmp_path)
    assert step_metrics(run, "plan") == {
        "plan.seconds": 0.5, "plan.shards": 2.0, "plan.rows": 500.0, "rows": 500.0
    }  # fmt: skip
    scored = step_metrics(run, "score")
    assert scored["rows_per_second"] == 250.0 and scored["score.seconds"] == 2.0
    assert "score.note" not in scored  # text is no metric


def test_the_gate_logs_the_verdict_and_the_drift_distances(tmp_path: Path) -> None:
    found = step_metrics(manifest(tmp_path), "validate_and_gate")
    assert found["validate.seconds"] == 1.0 and found["drift.seconds"] == 0.25
    assert found["validation.success"] == 1.0 and found["validation.failed"] == 1.0
    assert found["drift.p.distance"] == 0.1 and found["drift.p.moved_share"] == 0.02
    assert found["drift.passed"] == 1.0


def test_params_and_tags_name_the_run_the_model_and_the_store(tmp_path: Path) -> None:
    run = manifest(tmp_path)
    params = run_params(run)
    assert params["batch_size"] == "auto" and params["key_column"] == "customer_id"
    assert params["store"] == "redis://cache:6379/0" and params["input"] == "/data/in"
    tags = start_tags(run)
    assert tags["batchscore.model_name"] == "churn" and tags["batchscore.model_version"] == "3"
    assert tags["batchscore.model_id"] == "m-abc" and tags["batchscore.model_run_id"] == "r1"
    assert tags["batchscore.run_id"] == "run-1"


def test_the_experiment_is_the_namespaces_unless_set() -> None:
    assert experiment_name(RunSettings(), "churn") == "batchscore/churn"
    assert experiment_name(RunSettings(mlflow_experiment="all"), "churn") == "all"
