"""The pipeline's figures reach Prometheus: pushed to a real Pushgateway (behind basic auth,
as one is deployed), and written for a real node-exporter's textfile collector, both read
back the way Prometheus scrapes them. A failed run says so and keeps the last success."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from batchscore.testing import free_port, stop_process_groups, wait_for_http
from registry.errors import ModelNotFound
from scoring.errors import ValidationFailed
from tests.conftest import Registry, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER, PASSWORD = "batchscore", "push-s3cret"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, auth: tuple[str, str] | None = None) -> Samples:
    """Every sample of a /metrics page, by name and labels, as Prometheus reads them."""
    answer = httpx.get(url, auth=auth, timeout=10)
    answer.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def labels_of(samples: Samples, name: str, **labels: str) -> dict[str, str]:
    (found,) = [dict(ls) for (n, ls) in samples if n == name and set(labels.items()) <= ls]
    return found


def start(command: list[str], log: Path, url: str, ok: int = 200) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_http(url, process=process, log=log, ok=lambda status: status == ok)
    except BaseException:
        stop_process_groups([process])
        raise
    return process


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus-pushgateway on a free port, basic auth on (its web config)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
    url = f"http://127.0.0.1:{free_port()}"
    process = start(
        [
            "prometheus-pushgateway",
            f"--web.listen-address={url.removeprefix('http://')}",
            f"--web.config.file={config}",
            "--persistence.file=",
        ],
        tmp_path / "pushgateway.log",
        f"{url}/metrics",
        ok=401,  # up, and refusing who gives no password
    )
    yield url
    stop_process_groups([process])


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Debian's prometheus-node-exporter with only its textfile collector, on a free port."""
    folder = tmp_path / "textfile"
    folder.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    process = start(
        [
            "prometheus-node-exporter",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={folder}",
        ],
        tmp_path / "node-exporter.log",
        f"{url}/metrics",
    )
    yield url, folder
    stop_process_groups([process])


def check_success(samples: Samples, namespace: str, manifest_rows: int) -> float:
    """A published run's figures; returns the time of the success."""
    ns = {"namespace": namespace}
    assert value(samples, "batchscore_run_success", **ns) == 1.0
    assert value(samples, "batchscore_run_rows", **ns) == manifest_rows
    assert value(samples, "batchscore_run_rows_per_second", **ns) > 0
    for step in ("resolve", "plan", "score", "validate", "drift", "export", "publish"):
        assert value(samples, "batchscore_run_step_seconds", step=step, **ns) >= 0
    assert value(samples, "batchscore_run_validation_success", **ns) == 1.0
    assert value(samples, "batchscore_run_published", **ns) == 1.0
    assert value(samples, "batchscore_run_published_version", **ns) == 1.0
    return value(samples, "batchscore_run_last_success_timestamp_seconds", **ns)


def test_runs_push_their_figures_to_a_pushgateway(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    pushgateway: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = pushgateway.removeprefix("http://")
    monkeypatch.setenv("BATCHSCORE_PUSHGATEWAY_URL", f"http://{USER}:{PASSWORD}@{host}")
    auth = (USER, PASSWORD)
    published = run_job(dataset, "models:/churn@champion", "pushed")
    assert published.input is not None
    after_success = scrape(f"{pushgateway}/metrics", auth)
    succeeded_at = check_success(after_success, "pushed", published.input.rows)
    info = labels_of(after_success, "batchscore_run_info", namespace="pushed")
    assert info["job"] == "batchscore" and info["run_id"] == published.run_id
    assert info["model_version"] == published.model.version and info["failed_step"] == ""
    assert info["mlflow_run_id"] == published.mlflow_run_id

    # A run that fails its validation says so; the last success's figures stay.
    with pytest.raises(ValidationFailed):
        run_job(dataset, "models:/broken@champion", "pushed")
    after_failure = scrape(f"{pushgateway}/metrics", auth)
    ns = {"namespace": "pushed"}
    assert value(after_failure, "batchscore_run_success", **ns) == 0.0
    info = labels_of(after_failure, "batchscore_run_info", **ns)
    assert info["failed_step"] == "validate_and_gate" and info["model_name"] == "broken"
    assert value(after_failure, "batchscore_run_last_success_timestamp_seconds", **ns) == (
        succeeded_at
    )
    assert value(after_failure, "batchscore_run_last_failure_timestamp_seconds", **ns) >= (
        succeeded_at
    )
    assert value(after_failure, "batchscore_run_rows", **ns) == published.input.rows

    # A run that fails to resolve has no folder: its failure is pushed all the same, and it
    # is a FAILED MLflow run in the namespace's experiment.
    with pytest.raises(ModelNotFound):
        run_job(dataset, "models:/churn@nosuchalias", "pushed")
    after_resolve = scrape(f"{pushgateway}/metrics", auth)
    assert labels_of(after_resolve, "batchscore_run_info", **ns)["failed_step"] == "resolve"
    assert value(after_resolve, "batchscore_run_success", **ns) == 0.0
    client = MlflowClient(registry.tracking_uri)
    experiment = client.get_experiment_by_name("batchscore/pushed")
    assert experiment is not None
    (failed,) = client.search_runs(
        [experiment.experiment_id], "tags.`batchscore.failed_step` = 'resolve'"
    )
    assert failed.info.status == "FAILED"
    assert failed.data.tags["batchscore.error"].startswith("ModelNotFound: ")
    assert "nosuchalias" in failed.data.tags["batchscore.model_requested"]


def test_a_wrong_gateway_password_fails_nothing_and_leaks_nothing(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    pushgateway: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = pushgateway.removeprefix("http://")
    monkeypatch.setenv("BATCHSCORE_PUSHGATEWAY_URL", f"http://{USER}:wrong-s3cret@{host}")
    manifest = run_job(dataset, "models:/churn@champion", "refused")
    assert manifest.published  # figures are best effort: the run's outputs come first
    warned = [r.getMessage() for r in caplog.records if "Prometheus" in r.getMessage()]
    assert warned and "401" in warned[0] and f"{USER}@{host}" in warned[0]
    assert not any("wrong-s3cret" in r.getMessage() for r in caplog.records)
    assert "refused" not in str(scrape(f"{pushgateway}/metrics", (USER, PASSWORD)))


def test_runs_write_their_figures_for_node_exporter(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    node_exporter: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, folder = node_exporter
    monkeypatch.setenv("BATCHSCORE_METRICS_TEXTFILE_DIR", str(folder))
    published = run_job(dataset, "models:/churn@champion", "textfiled")
    assert published.input is not None
    assert [p.name for p in folder.iterdir()] == ["batchscore_textfiled.prom"]
    succeeded_at = check_success(scrape(f"{url}/metrics"), "textfiled", published.input.rows)

    with pytest.raises(ValidationFailed):
        run_job(dataset, "models:/broken@champion", "textfiled")
    after_failure = scrape(f"{url}/metrics")
    ns = {"namespace": "textfiled"}
    assert value(after_failure, "batchscore_run_success", **ns) == 0.0
    assert labels_of(after_failure, "batchscore_run_info", **ns)["failed_step"] == (
        "validate_and_gate"
    )
    assert value(after_failure, "batchscore_run_last_success_timestamp_seconds", **ns) == (
        succeeded_at
    )
    assert value(after_failure, "batchscore_run_rows", **ns) == published.input.rows
    # node-exporter read every file without an error (a half-written file would be one).
    assert value(after_failure, "node_textfile_scrape_error") == 0.0
    assert [p.name for p in folder.iterdir()] == ["batchscore_textfiled.prom"]
