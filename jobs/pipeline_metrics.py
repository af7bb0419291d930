"""The run's figures for Prometheus: pushed to a Pushgateway, written for node-exporter.

A scoring run lives shorter than a scrape interval, so its figures are handed over at its
end, the two ways Prometheus offers batch jobs (settings ``pushgateway_url`` and
``metrics_textfile_dir``; either, both or neither):

- **Pushgateway**: one group per namespace (``job="batchscore", namespace=<ns>``);
- **textfile** (node-exporter's textfile collector): ``batchscore_<namespace>.prom`` in the
  folder, written under a temporary name and renamed, so the collector never reads half a
  file.

A run that succeeds replaces the namespace's figures with its own: rows and rows/s, each
step's seconds, the validation verdict, the drift distances, the version published, the
time of this success. A run that fails replaces only what says so — ``batchscore_run_success``
0, the time it ended and failed, and ``batchscore_run_info`` naming the run and the step that
failed — and leaves the last success's figures as they were (a POST to the gateway; for the
textfile, the figures carried over from the file it replaces), so an alert on the age of
the last success works, and a dashboard still shows what the live version came from.

``jobs.flow`` reports at the end of a run (publish) and when a step raises. Like the MLflow
record (``jobs.tracking``), reporting is best effort: a gateway that is down is a warning,
and the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Metric,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from batchscore.core.settings import RunSettings
from batchscore.core.urls import public_url, split_password
from jobs.manifest import Manifest

log = logging.getLogger("batchscore.jobs")

JOB = "batchscore"
PUSH_TIMEOUT_SECONDS = 10.0
LAST_SUCCESS = "batchscore_run_last_success_timestamp_seconds"
LAST_FAILURE = "batchscore_run_last_failure_timestamp_seconds"
STEPS = ("resolve", "plan", "score", "validate", "drift", "export", "publish")


def report(
    settings: RunSettings,
    namespace: str,
    manifest: Manifest | None,
    *,
    failed_step: str | None = None,
) -> None:
    """Hand the run's figures to the Pushgateway and the textfile the settings name.

    ``manifest`` is None for a run that failed before it had one (its resolve).
    """
    gateway, folder = settings.pushgateway_url, settings.metrics_textfile_dir
    if gateway is not None:
        registry = run_registry(namespace, manifest, failed_step)
        _best_effort(
            lambda: push(gateway, namespace, registry, replace=failed_step is None),
            f"push to {public_url(gateway)}",
            gateway,
        )
    if folder is not None:
        _best_effort(
            lambda: write_textfile(folder, namespace, manifest, failed_step),
            f"write {textfile_path(folder, namespace)}",
        )


def run_registry(
    namespace: str, manifest: Manifest | None, failed_step: str | None
) -> CollectorRegistry:
    """The figures a run hands over: all of them when it succeeded, the failure's when not."""
    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        if name not in gauges:
            gauges[name] = Gauge(name, doc, ["namespace", *labels], registry=registry)
        gauges[name].labels(namespace=namespace, **labels).set(value)

    now = time.time()
    gauge("batchscore_run_success", "1 when the last run ended without error.", failed_step is None)
    gauge("batchscore_run_last_end_timestamp_seconds", "When the last run ended.", now)
    gauge(
        "batchscore_run_info",
        "The last run: its id, the model version it scored, its MLflow run, the step it "
        "failed in (empty when none).",
        1,
        run_id=manifest.run_id if manifest else "",
        model_name=manifest.model.name if manifest else "",
        model_version=manifest.model.version if manifest else "",
        mlflow_run_id=(manifest.mlflow_run_id or "") if manifest else "",
        failed_step=failed_step or "",
    )
    if failed_step is not None:
        gauge(LAST_FAILURE, "When a run of the namespace last failed.", now)
    else:
        gauge(LAST_SUCCESS, "When a run of the namespace last ended without error.", now)
        if manifest is not None:
            _success_figures(manifest, gauge)
    return registry


class _GaugeSetter(Protocol):  # run_registry's inner ``gauge``
    def __call__(self, name: str, doc: str, value: float, **labels: str) -> None: ...


def _success_figures(manifest: Manifest, gauge: _GaugeSetter) -> None:
    if manifest.input is not None:
        gauge(
            "batchscore_run_rows", "Rows in the last successful run's input.", manifest.input.rows
        )
    score = manifest.steps.get("score", {})
    if score.get("rows_per_second"):
        gauge("batchscore_run_rows_per_second", "Rows scored per second.", score["rows_per_second"])
    for step in STEPS:
        seconds = manifest.steps.get(step, {}).get("seconds")
        if isinstance(seconds, int | float):
            gauge("batchscore_run_step_seconds", "Seconds the step took.", seconds, step=step)
    validation = manifest.validation or {}
    if "success" in validation:
        gauge(
            "batchscore_run_validation_success", "1 when validation passed.", validation["success"]
        )
    drift = manifest.drift or {}
    if "passed" in drift:
        gauge("batchscore_run_drift_passed", "1 when the drift gate passed.", drift["passed"])
    for output in drift.get("outputs", []):
        gauge(
            "batchscore_run_drift_distance",
            "Distance of the output's distribution from the live version's.",
            float(output["distance"]),
            output=str(output["output"]),
        )
    gauge("batchscore_run_published", "1 when the run's version went live.", manifest.published)
    if manifest.published and manifest.version is not None:
        gauge(
            "batchscore_run_published_version", "The version the run published.", manifest.version
        )


def push(url: str, namespace: str, registry: CollectorRegistry, *, replace: bool) -> None:
    """Send the figures to the namespace's group: PUT replaces the group, POST only the
    metrics it names. A user and password in the URL go as basic auth, not in the URL
    the request is sent to."""
    bare, password = split_password(url)
    parts = urlsplit(bare)
    handler = default_handler
    if parts.username is not None:
        user, secret = parts.username, password or ""

        def handler(  # type: ignore[no-untyped-def]
            url,
            method,
            timeout,
            headers,
            data,  # noqa: ANN001
        ):  # noqa: ANN202
            return basic_auth_handler(url, method, timeout, headers, data, user, secret)

        bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    send = push_to_gateway if replace else pushadd_to_gateway
    send(
        bare,
        job=JOB,
        registry=registry,
        grouping_key={"namespace": namespace},
        timeout=PUSH_TIMEOUT_SECONDS,
        handler=handler,
    )


def textfile_path(folder: Path, namespace: str) -> Path:
    return folder / f"batchscore_{namespace}.prom"


def write_textfile(
    folder: Path, namespace: str, manifest: Manifest | None, failed_step: str | None
) -> Path:
    """Replace the namespace's file in one rename; a failure keeps the last success's
    figures from the file it replaces."""
    path = textfile_path(folder, namespace)
    folder.mkdir(parents=True, exist_ok=True)
    registry = run_registry(namespace, manifest, failed_step)
    if failed_step is not None:
        registry.register(_Kept(path, {m.name for m in registry.collect()}))
    write_to_textfile(str(path), registry)  # writes a temporary file, then renames it
    return path


class _Kept(Collector):
    """The metric families of an earlier file, less those a failed run replaces."""

    def __init__(self, path: Path, replaced: set[str]) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        self.families = [f for f in text_string_to_metric_families(text) if f.name not in replaced]

    def collect(self) -> Iterable[Metric]:
        return self.families


def _best_effort(call: Callable[[], object], what: str, secret_url: str | None = None) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - see the module's docstring
        message = str(exc)
        password = split_password(secret_url)[1] if secret_url else None
        if password:
            message = message.replace(password, "***")
        log.warning("could not %s the run's metrics for Prometheus: %s", what, message)
