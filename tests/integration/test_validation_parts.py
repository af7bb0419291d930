"""Output validation per part on the Dask workers, and across parts in the validate step.

Every run here scores on a real LocalCluster (two worker processes): the per-part
GX suite runs on the workers as each part is written; the validate step merges the
results, re-checks stale parts on a cluster of its own, and checks the row count and
key uniqueness across all parts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchscore.core.settings import RunSettings, load_settings
from jobs import flow, steps
from jobs.manifest import Manifest, load_manifest
from kv_export.store import open_store
from scoring.errors import ValidationFailed
from tests.conftest import KEY, run_job
from tests.integration.test_bad_input import write

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
OUTPUT = "churn_probability"
ROWS = 200  # per input file; one file per shard (BATCHSCORE_SHARD_ROWS below)


@pytest.fixture
def one_file_per_shard(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSCORE_SHARD_ROWS", str(ROWS))


def score(input_path: Path, namespace: str) -> Manifest:
    """resolve → plan → score, as the DAG's first tasks do; validation comes separately."""
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(input_path),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace=namespace,
    )
    run_dir = steps.resolve(settings, params)["run_dir"]
    steps.plan(run_dir)
    steps.score(run_dir)
    return load_manifest(run_dir)


def failed_validation(manifest: Manifest) -> tuple[str, Manifest]:
    with pytest.raises(ValidationFailed) as caught:
        steps.validate(manifest.run_dir)
    assert open_store(manifest.params.store_url).state(manifest.namespace).versions == {}
    return " ".join(str(caught.value).split()), load_manifest(manifest.run_dir)


def part_result(manifest: Manifest, shard: int) -> dict[str, object]:
    stem = Path(manifest.shards[shard].part).stem
    return json.loads((Path(manifest.run_dir) / "validation" / f"{stem}.json").read_text())


def test_a_part_failing_an_expectation_on_its_worker_is_named(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    nan_rows = np.full(ROWS, 0.5, dtype=np.float32)
    nan_rows[:7] = np.nan  # not null for the input checks; a NaN prediction for the model
    write(tmp_path / "in", "a.parquet")
    write(tmp_path / "in", "b.parquet", f01=nan_rows, **{KEY: np.arange(ROWS) + ROWS})
    write(tmp_path / "in", "c.parquet", **{KEY: np.arange(ROWS) + 2 * ROWS})
    manifest = score(tmp_path / "in", "per-part")
    assert len(manifest.shards) == 3

    # The workers checked each part as they wrote it: part 1 failed there.
    worker_side = [part_result(manifest, i) for i in range(3)]
    assert [r["success"] for r in worker_side] == [True, False, True]
    assert all(r["rows"] == ROWS and r["checked_by"] for r in worker_side)

    message, checked = failed_validation(manifest)
    assert (
        f"expect_column_values_to_not_be_null on column '{OUTPUT}' (7 unexpected values, "
        f"e.g. [None, None, None, None, None]) in part-00001.parquet (7 unexpected)"
    ) in message
    assert "part-00000" not in message and "part-00002" not in message
    step = checked.steps["validate"]
    assert step["failed_parts"] == ["part-00001.parquet"]
    assert (step["parts_reused"], step["parts_rechecked"]) == (3, 0)
    assert checked.summary()["validation"]["failed_parts"] == ["part-00001.parquet"]
    # The Data Docs: the run's summed result, and a page of its own for the failing part.
    docs = Path(checked.reports["data_docs"]).parent
    pages = sorted(p.name for p in docs.glob("validations/**/*.html"))
    assert pages == ["all-parts.html", "part-00001.parquet.html"], pages
    summed = next(docs.glob("validations/**/all-parts.html")).read_text()
    assert "7 unexpected values found" in summed and "part-00001.parquet" in summed


def test_duplicate_keys_across_two_parts_fail_the_global_check(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    write(tmp_path / "in", "a.parquet")  # keys 0..199
    write(tmp_path / "in", "b.parquet", **{KEY: np.arange(ROWS) + 150})  # 150..349
    write(tmp_path / "in", "c.parquet", **{KEY: np.arange(ROWS) + 1000})  # its own range
    manifest = score(tmp_path / "in", "dupes")
    # Within each part the keys are unique: only the check across parts can see it.
    assert all(part_result(manifest, i)["success"] for i in range(3))

    message, checked = failed_validation(manifest)
    assert (
        f"expect_column_values_to_be_unique on column '{KEY}' across all parts "
        "(100 unexpected values, e.g. [150, 151, 152, 153, 154]) in "
        "part-00000.parquet (50 rows with a repeated key), "
        "part-00001.parquet (50 rows with a repeated key)"
    ) in message
    assert "part-00002" not in message
    assert checked.steps["validate"]["failed_parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert checked.validation is not None
    (unique,) = [
        o for o in checked.validation["outcomes"] if o["column"] == KEY and not o["success"]
    ]
    assert unique["scope"] == "all parts" and unique["unexpected_count"] == 100
    assert unique["parts"] == {
        "part-00000.parquet": "50 rows with a repeated key",
        "part-00001.parquet": "50 rows with a repeated key",
    }


def test_a_row_count_mismatch_is_caught_and_the_part_checked_again(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    for i, name in enumerate(("a", "b", "c")):
        write(tmp_path / "in", f"{name}.parquet", **{KEY: np.arange(ROWS) + i * ROWS})
    manifest = score(tmp_path / "in", "rows")
    assert steps.validate(manifest.run_dir)["success"]
    # A part loses a row after scoring: its worker-side result no longer describes it.
    part = Path(manifest.shards[2].part)
    table = pq.read_table(part)
    pq.write_table(table.slice(0, ROWS - 1), part)

    message, checked = failed_validation(manifest)
    assert (
        f"expect_table_row_count_to_equal across all parts (observed {3 * ROWS - 1}, "
        f"expected {3 * ROWS}) "
        f"in part-00002.parquet ({ROWS - 1} rows, its shard has {ROWS})"
    ) in message
    step = checked.steps["validate"]
    assert (step["parts_reused"], step["parts_rechecked"]) == (2, 1)
    assert step["rows"] == 3 * ROWS - 1 and step["failed_parts"] == ["part-00002.parquet"]
    rechecked = part_result(checked, 2)
    assert rechecked["rows"] == ROWS - 1 and rechecked["success"] is False
    # Checked again by the validate step: the result describes the file as it is now.
    assert (rechecked["part_size"], rechecked["part_mtime_ns"]) == (
        part.stat().st_size,
        part.stat().st_mtime_ns,
    )


def test_without_checks_in_score_the_validate_step_checks_every_part_on_a_cluster(
    one_file_per_shard: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i, name in enumerate(("a", "b")):
        write(tmp_path / "in", f"{name}.parquet", **{KEY: np.arange(ROWS) + i * ROWS})
    monkeypatch.setenv("BATCHSCORE_CHECK_PARTS_IN_SCORE", "false")
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(tmp_path / "in"),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace="late",
    )
    assert params.check_parts_in_score is False
    run_dir = steps.resolve(settings, params)["run_dir"]
    steps.plan(run_dir)
    steps.score(run_dir)
    assert not (Path(run_dir) / "validation").exists()
    assert steps.validate(run_dir) == {"run_dir": run_dir, "success": True, "rows": 2 * ROWS}
    step = load_manifest(run_dir).steps["validate"]
    assert (step["parts_reused"], step["parts_rechecked"]) == (0, 2)
    # Checked once: running the step again uses the results it stored.
    steps.validate(run_dir)
    step = load_manifest(run_dir).steps["validate"]
    assert (step["parts_reused"], step["parts_rechecked"]) == (2, 0)


def test_a_passing_runs_data_docs_are_built_beside_the_run_and_waited_for(
    env: dict[str, str], dataset: Path
) -> None:
    manifest = run_job(dataset, "models:/churn/1", "docs-aside")
    step = manifest.steps["validate"]
    assert step["success"] and step["docs_built_on"].startswith("background process ")
    assert step["docs_seconds"] > 0 and 0 <= step["docs_waited_seconds"] <= step["docs_seconds"]
    assert "docs_error" not in step
    index = Path(manifest.reports["data_docs"])
    assert index.is_file() and next(index.parent.glob("validations/**/all-parts.html"))
    assert manifest.published and manifest.version is not None


def test_data_docs_that_fail_to_build_leave_the_verdict_and_the_run_alone(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    for i, name in enumerate(("a", "b")):
        write(tmp_path / "in", f"{name}.parquet", **{KEY: np.arange(ROWS) + i * ROWS})
    manifest = score(tmp_path / "in", "docs-fail")
    (Path(manifest.run_dir) / "data_docs").write_text("a file where the docs' folder goes")
    gate = flow.validate_and_gate(manifest.run_dir)  # waits for the builder
    assert gate["success"] and gate["rows"] == 2 * ROWS
    checked = load_manifest(manifest.run_dir)
    step = checked.steps["validate"]
    assert step["success"] and "exited with status 1" in step["docs_error"]
    assert "data_docs" not in checked.reports
    flow.export_and_compare(manifest.run_dir)
    assert flow.publish_run(manifest.run_dir)["version"] == 1


def test_the_dag_validate_task_leaves_its_reports_to_the_reports_task(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    """The DAG's validate task writes the Data Docs job and starts nothing (``docs_later``),
    and its drift gate leaves the samples of its plot; the reports task makes both beside
    the export (``build_left``) and records that in a file of its own, which every reader
    of the manifest sees in the validate and drift steps, while the manifest itself is the
    export's to write. A run published earlier makes nothing."""
    from jobs import data_docs
    from jobs.manifest import DOCS_RECORD

    for i, name in enumerate(("a", "b")):
        write(tmp_path / "in", f"{name}.parquet", **{KEY: np.arange(ROWS) + i * ROWS})
    manifest = score(tmp_path / "in", "docs-later")
    gate = flow.validate_and_gate(manifest.run_dir, docs_later=True)
    assert gate["success"] and manifest.run_dir not in data_docs._builds
    validated = load_manifest(manifest.run_dir)
    step = validated.steps["validate"]
    assert step["docs_built_on"] == data_docs.LATER and Path(step["docs_job"]).is_file()
    index = Path(validated.reports["data_docs"])
    assert not index.exists(), "built by the validate task after all"
    plot = Path(validated.reports["distributions_png"])
    assert not plot.exists() and Path(validated.steps["drift"]["plot_job"]).is_file()

    flow.export_and_compare(manifest.run_dir)
    assert not index.exists(), "the export built or waited for them"
    written = Path(validated.path).read_bytes()
    built = data_docs.build_left(manifest.run_dir)
    assert built is not None and built["index"] == str(index) and "docs_error" not in built
    assert index.is_file() and next(index.parent.glob("validations/**/all-parts.html"))
    assert built["plot"] == str(plot) and plot.is_file() and "plot_error" not in built
    assert Path(validated.path).read_bytes() == written, "the reports task wrote the manifest"
    assert (Path(step["docs_job"]).parent / DOCS_RECORD).is_file()
    step = load_manifest(manifest.run_dir).steps["validate"]
    assert step["docs_built_on"] == f"{data_docs.LATER}, process {os.getpid()}"
    assert step["docs_seconds"] > 0 and step["docs_waited_seconds"] == 0.0
    assert "docs_error" not in step
    drift = load_manifest(manifest.run_dir).steps["drift"]
    assert drift["plot_seconds"] > 0 and "plot_error" not in drift
    assert data_docs.build_left(manifest.run_dir) is None, "built twice"
    # A validate task run again (a clear) leaves a new job: the earlier record goes.
    flow.validate_and_gate(manifest.run_dir, docs_later=True)
    assert load_manifest(manifest.run_dir).steps["validate"]["docs_built_on"] == data_docs.LATER
    assert data_docs.build_left(manifest.run_dir) is not None

    flow.publish_run(manifest.run_dir)
    assert flow.validate_and_gate(manifest.run_dir, docs_later=True)["published_earlier"]
    assert data_docs.build_left(manifest.run_dir) is None  # validate did not run again
    assert data_docs.on_cluster("tcp://127.0.0.1:8786", manifest.run_dir)
    assert not data_docs.on_cluster("tcp://127.0.0.1:8786", "s3://bucket/runs/ns/run-1")
    assert not data_docs.on_cluster("local", manifest.run_dir)


def test_a_reports_task_whose_reports_fail_records_why_and_the_run_goes_on(
    one_file_per_shard: None, tmp_path: Path
) -> None:
    from jobs import data_docs

    write(tmp_path / "in", "a.parquet", **{KEY: np.arange(ROWS)})
    manifest = score(tmp_path / "in", "docs-broken")
    flow.validate_and_gate(manifest.run_dir, docs_later=True)
    job = Path(load_manifest(manifest.run_dir).steps["validate"]["docs_job"])
    job.write_text(json.dumps({"docs_dir": str(job.parent.parent / "data_docs")}))
    Path(load_manifest(manifest.run_dir).steps["drift"]["plot_job"]).write_bytes(b"not a zip")
    built = data_docs.build_left(manifest.run_dir)
    assert built is not None and built["index"] is None and built["plot"] is None
    assert built["docs_error"].startswith("KeyError: ")
    assert built["plot_error"].startswith("ValueError: ")  # numpy refuses what is no .npz
    checked = load_manifest(manifest.run_dir)
    assert checked.steps["validate"]["docs_error"] == built["docs_error"]
    assert checked.steps["drift"]["plot_error"] == built["plot_error"]
    assert checked.steps["validate"]["success"] and "data_docs" not in checked.reports
    assert "distributions_png" not in checked.reports
    flow.export_and_compare(manifest.run_dir)
    assert flow.publish_run(manifest.run_dir)["version"] == 1
