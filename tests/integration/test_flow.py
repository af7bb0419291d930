"""``jobs.flow``'s rules on the command line, against a real MLflow registry (SQLite), Dask
and the embedded store: a shadow run (``batchscore run --shadow``) and the "published
earlier" rule, which the DAG's tasks apply through the same functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchscore.core.settings import RunSettings, load_settings
from jobs.manifest import load_manifest
from kv_export.store import open_store
from tests.conftest import KEY, Registry, client_alias, run_cli, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def cli_run(dataset: Path, model: str, namespace: str, *extra: str) -> list[str]:
    return [
        "run", "--input", str(dataset), "--model", model, "--key-column", KEY,
        "--namespace", namespace, *extra,
    ]  # fmt: skip


def test_a_shadow_run_on_the_command_line_reports_and_publishes_nothing(
    env: dict[str, str], registry: Registry, dataset: Path, tmp_path: Path
) -> None:
    live = run_cli(*cli_run(dataset, "models:/churn/2", "shadowed"), env=env)
    assert live.returncode == 0, live.stderr
    store_url = load_settings(RunSettings).resolved_store_url
    before = open_store(store_url).state("shadowed")
    client_alias("churn", "1", registry.tracking_uri, alias="challenger")

    summary_path = tmp_path / "shadow.json"
    args = cli_run(dataset, "models:/churn@champion", "shadowed", "--shadow", "challenger")
    shadow = run_cli(*args, "--summary-json", str(summary_path), env=env | {"COLUMNS": "300"})
    assert shadow.returncode == 0, shadow.stderr

    summary = json.loads(summary_path.read_text())
    assert summary["shadow"] == "models:/churn@challenger"
    assert summary["published"] is False and summary["model"]["version"] == "1"
    assert set(summary["steps"]) >= {"shadow", "validate", "export", "publish"}
    assert "drift" not in summary["steps"]  # a shadow run is compared, not gated
    assert summary["steps"]["publish"]["skipped"].startswith("shadow run: version 2 stays")
    report_path = Path(summary["reports"]["shadow_comparison"])
    assert f"shadow comparison report: file://{report_path}" in shadow.stdout
    report = json.loads(report_path.read_text())
    assert report["candidate"]["requested"] == "models:/churn@challenger"
    assert report["candidate"]["version"] == "1" and report["candidate"]["store_version"] == 2
    assert report["live"]["version"] == before.live and report["live"]["model_version"] == "2"
    [compared] = report["outputs"]
    assert compared["joined_keys"] == 12_000 and 0.5 < compared["changed_share"] <= 1.0
    assert report["promote"] == "batchscore model promote churn 1 --alias champion"

    after = open_store(store_url).state("shadowed")
    assert after.live == before.live and after.history == before.history
    unpublished = after.versions[after.runs[Path(summary["run_dir"]).name]]
    assert unpublished.state == "complete" and unpublished.published_at is None
    # The shadow run has a folder of its own, beside the regular run of the same inputs.
    runs = sorted(p.name for p in Path(summary["run_dir"]).parent.iterdir())
    assert len(runs) == 2 and any(r.startswith("shadow-") for r in runs)


def test_the_live_model_is_refused_as_its_own_shadow(env: dict[str, str], dataset: Path) -> None:
    args = cli_run(dataset, "models:/churn@champion", "selfish", "--shadow", "champion")
    done = run_cli(*args, env=env)
    assert done.returncode == 3  # bad input: the command named the wrong candidate
    assert "is the live model itself" in " ".join(done.stderr.split())
    assert not (load_settings(RunSettings).runs_dir / "selfish").exists()


def test_a_run_published_earlier_is_not_gated_again(env: dict[str, str], dataset: Path) -> None:
    """Run again after a newer run went live, a published run keeps its verdict: its
    validation and drift gate are not run again (the newer live version would fail
    the gate), and the live version stays the newer one."""
    first = run_job(dataset, "models:/churn/1", "earlier")
    assert first.published
    newer = run_job(dataset, "models:/churn/2", "earlier", force=True)  # past the drift gate
    assert newer.published and newer.version != first.version
    validated_at = first.steps["validate"]["finished_at"]

    again = run_job(dataset, "models:/churn/1", "earlier")
    assert again.run_id == first.run_id
    assert again.steps["validate"]["finished_at"] == validated_at  # not validated again
    assert again.steps["export"]["reused"] is True
    assert again.steps["publish"]["note"] == "published earlier; not published again"
    state = open_store(load_settings(RunSettings).resolved_store_url).state("earlier")
    assert state.live == newer.version and len(state.versions) == 2
    assert load_manifest(again.run_dir).published
