"""Where a run's Data Docs are built, so that GX's import stays off the run's critical path.

The verdict of the validate step needs no GX (``scoring.validation.arrow_checks``); the
Data Docs, GX's HTML pages of that verdict, do, and importing GX costs seconds of CPU
(docs/benchmarks.md). So:

- **a running cluster** (``tcp://``/``tls://``): one of its workers builds them; it
  has GX imported already (``scoring.preload``). If the cluster cannot take the job,
  they are built in the validate step's process (``DocsOnCluster``);
- **otherwise** (the default path: ``batchscore run``, each DAG task): a process of
  their own builds them while the run goes on (``DocsInBackground``).
  ``batchscore run`` starts that process as the run starts (``prepare``), so that GX
  is imported while the model is resolved, on the core that resolving leaves idle, and
  it builds them while the drift gate and the export run. The DAG's validate task
  leaves them to a task of their own (``later``: the job is written, nothing started):
  ``reports``, beside the export and publish tasks, which imports GX and builds them
  (``build_left``) while the version is exported and published, so that no task of the
  run's critical path waits for GX's import; it draws the drift gate's plot too, from
  the samples the gate left (``jobs.drift_gate.plot_left``: matplotlib's import and the
  drawing). That task records them in a file of its own (``jobs.manifest.DOCS_RECORD``),
  which ``load_manifest`` merges into the validate and drift steps: it runs beside the
  export task, and both rewriting the manifest would lose one's update. The run's MLflow
  run logs them when they are there as it ends (``jobs.tracking``); when they come
  later, the reports task logs them itself. A run folder on an object store keeps them
  in the validate task (its local Data Docs folder is on that task's host), and a
  validate task that fails after a passing verdict (the drift gate) builds them before
  it ends, since no export follows. ``finish`` waits for a background builder before
  the run's reports are recorded (the MLflow run logs the pages) and notes in the
  validate step's record how long it took and how long the run waited;
- **a failing verdict**: built before the validate step raises, whatever the cluster:
  the error message names the page, which must exist when it is read.

The pages of a run whose Data Docs failed are missing, and ``finish`` says why in a
warning and in the manifest (``docs_error``); the verdict stands either way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.manifest import DOCS_LATER, DOCS_RECORD, DOCS_RUN_ENDED, load_manifest

if TYPE_CHECKING:
    from jobs.results import ReportsBuilt

    # Arrow and numpy come with the validation package: every DAG task imports this module
    from scoring.validation.documents import ResultDocument

log = logging.getLogger(__name__)

LATER = DOCS_LATER  # docs_built_on of a passing run whose Data Docs that DAG task builds
CLUSTER_TIMEOUT = 60  # seconds to connect to a running cluster, and for its Data Docs
BUILD_TIMEOUT = 300  # seconds a build may take, from its job, before it is stopped
JOB_FILE = "docs-job.json"  # in the run's validation folder: what the builder is given


class DocsOnCluster:
    """On a running cluster, one of its workers builds the Data Docs (GX imported there
    already), into the run's folder, which the workers share (they wrote the parts
    there). If the cluster cannot take the job, they are built here. ``built_on`` says
    where they were."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.built_on = ""

    def __call__(self, *args: Any) -> Path | None:  # scoring.validation.DocsBuilder
        from distributed import Client

        from scoring.validation import build_data_docs

        try:
            with Client(self.address, timeout=CLUSTER_TIMEOUT) as client:
                future = client.submit(build_data_docs, *args, pure=False)
                index = future.result(timeout=CLUSTER_TIMEOUT)
            self.built_on = self.address
            return index
        except (OSError, TimeoutError) as exc:
            log.warning(
                "the cluster at %s could not build the Data Docs (%s: %s); building them here",
                self.address,
                type(exc).__name__,
                exc,
            )
        self.built_on = "validate task"
        return build_data_docs(*args)


@dataclass
class _Build:
    process: subprocess.Popen[bytes]
    started: float  # when the builder was given its job
    log_path: Path
    built_on: str = ""  # recorded by finish as docs_built_on (build_later's builds)


_builds: dict[str, _Build] = {}  # run folder → its Data Docs being built
_prepared: _Build | None = None  # a builder importing GX, waiting for a job


def on_cluster(cluster: str, run_location: str | Path) -> bool:
    """Whether a worker of the run's cluster builds its Data Docs: a running cluster and
    a run folder the workers share (they wrote the parts there). A run folder on an
    object store has its Data Docs on the host of the validate step."""
    from batchscore.core import storage
    from batchscore.core.settings import is_running_cluster

    return is_running_cluster(cluster) and not storage.is_remote(run_location)


def prepare() -> None:
    """Start a builder now, so that it imports GX while the run resolves its model (the
    MLflow import and the download use one core; the builder takes another) and waits
    for its job on standard input. Without a job it exits when this process does (its
    input closes). ``DocsInBackground`` gives it the job; without one prepared, it starts
    its own."""
    global _prepared
    if _prepared is None or _prepared.process.poll() is not None:
        _prepared = _start_builder()


def _start_builder() -> _Build:
    with tempfile.NamedTemporaryFile(prefix="batchscore-docs-", suffix=".log", delete=False) as f:
        log_path = Path(f.name)
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.data_docs"],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
    return _Build(process, time.perf_counter(), log_path)


def _give(job: Path) -> _Build:
    """The prepared builder (or a new one), given ``job``."""
    global _prepared
    build, _prepared = _prepared, None
    if build is None or build.process.poll() is not None:
        build = _start_builder()
    assert build.process.stdin is not None
    try:
        build.process.stdin.write(f"{job}\n".encode())
        build.process.stdin.close()
    except OSError:  # it died meanwhile: finish() reports its status
        pass
    build.started = time.perf_counter()
    return build


class DocsInBackground:
    """Builds the run's Data Docs in a process of their own (``python -m jobs.data_docs``,
    started earlier by ``prepare`` where the caller could): a passing run's while the
    caller goes on, to be waited for by ``finish(run_dir)``, or with ``later`` by the
    DAG's reports task (``build_left``); a failing run's at once (its error message
    names the page). The index's path is returned before the pages exist."""

    def __init__(self, run_dir: str | Path, *, later: bool = False) -> None:
        self.run_dir = str(run_dir)
        self.later = later
        self.built_on = ""
        self.job: Path | None = None  # the job written, for build_left

    def __call__(
        self,
        docs_dir: Path,
        run_name: str,
        merged: list[ResultDocument],
        success: bool,
        reports: Sequence[Any],
        failing: Sequence[Any],
    ) -> Path | None:
        from scoring.validation.documents import write_json

        job = docs_dir.parent / "validation" / JOB_FILE  # the run's local folder
        write_json(
            job,
            {
                "docs_dir": str(docs_dir),
                "run_name": run_name,
                "merged": merged,
                "success": success,
                "reports": [asdict(r) for r in reports],
                "failing": [asdict(r) for r in failing],
            },
        )
        self.job = job
        # A validate step run again leaves a new job: an earlier build's record and mark
        # are not this one's (the reports task builds the new one).
        for stale in (DOCS_RECORD, DOCS_RUN_ENDED):
            (job.parent / stale).unlink(missing_ok=True)
        index = docs_dir / "index.html"
        if self.later and success:
            self.built_on = LATER
            return index
        build = _builds[self.run_dir] = _give(job)
        self.built_on = f"background process {build.process.pid}"
        if not success:
            finish(self.run_dir, record=False)
            return index if index.is_file() else None
        return index


def build_later(run_dir: str | Path, by: str = "validate step") -> None:
    """Start building the Data Docs that the run's validate step left for later, in a
    process of their own (the DAG's validate task, when the drift gate blocks a passing
    run: no reports task follows; ``finish`` waits for them); nothing to do for any
    other run, or when they are being built already. ``by`` names the step in the record
    (``docs_built_on``), which ``finish`` writes: until then the record says they are left
    for later."""
    manifest = load_manifest(run_dir)
    step = manifest.steps.get("validate") or {}
    job = step.get("docs_job")
    if step.get("docs_built_on") != LATER or not job or manifest.run_dir in _builds:
        return
    build = _builds[manifest.run_dir] = _give(Path(job))
    build.built_on = f"background process {build.process.pid} of the {by}"


def build_left(run_dir: str | Path) -> ReportsBuilt | None:
    """The DAG's reports task: build, in this process, the Data Docs that the run's
    validate step left for it, and the drift plot its drift gate left (``plot_job``),
    and record them (``DOCS_RECORD``: where and how long, or why not); None when nothing
    was left (the validate step built them, or a run published earlier was not validated
    again). A report that fails is a warning and ``docs_error`` or ``plot_error`` in the
    record, as on every path: the verdict stands and the run goes on. When the run's
    MLflow run ended before they were there (``jobs.tracking``), they are logged to it
    here."""
    manifest = load_manifest(run_dir)
    step = manifest.steps.get("validate") or {}
    job = step.get("docs_job")
    if step.get("docs_built_on") != LATER or not job:
        return None
    from scoring.validation.documents import write_json

    started = time.perf_counter()
    index, error = _build_in_process(Path(job))
    built: ReportsBuilt = {
        "run_dir": manifest.run_dir,
        "index": str(index) if index and error is None else None,
        "docs_built_on": f"{LATER}, process {os.getpid()}",
        "docs_seconds": round(time.perf_counter() - started, 3),
        "docs_waited_seconds": 0.0,  # no step of the run waited for them
        "plot": None,
    }
    if error is not None:
        log.warning("the Data Docs of run %s were not built: %s", manifest.run_id, error)
        built["docs_error"] = error
    record: dict[str, dict[str, Any]] = {
        "validate": {k: v for k, v in built.items() if k.startswith("docs_")}
    }
    drift = manifest.steps.get("drift") or {}
    if drift.get("plot_job"):
        plot, built["plot_seconds"], plot_error = _plot_left(manifest.run_id, drift)
        built["plot"] = plot
        if plot_error is not None:
            built["plot_error"] = plot_error
        record["drift"] = {k: v for k, v in built.items() if k.startswith("plot_")}
    folder = Path(job).parent
    write_json(folder / DOCS_RECORD, record)
    # Written, then looked for: the run's end in MLflow marks itself, then looks for this
    # record (jobs.tracking), so of two that pass each other one at least sees the other.
    if (folder / DOCS_RUN_ENDED).exists():
        from jobs import tracking

        tracking.log_left_reports(run_dir)
    return built


def _build_in_process(job: Path) -> tuple[Path | None, str | None]:
    """The Data Docs of ``job``, built here: the index, or why there is none."""
    from scoring.validation import import_gx

    try:
        import_gx()
        index = build_from_job(job)
    except Exception as exc:  # noqa: BLE001 - the verdict stands without its pages
        return None, f"{type(exc).__name__}: {exc}"
    return (index, None) if index is not None else (None, "GX wrote no index page")


def _plot_left(run_id: str, drift: dict[str, Any]) -> tuple[str | None, float, str | None]:
    """The drift plot the gate left: its path and seconds, or why it is missing."""
    from jobs.drift_gate import plot_left

    started = time.perf_counter()
    try:
        plot = str(plot_left(drift))
    except Exception as exc:  # noqa: BLE001 - the gate's verdict stands without its plot
        error = f"{type(exc).__name__}: {exc}"
        log.warning("the drift plot of run %s was not drawn: %s", run_id, error)
        return None, round(time.perf_counter() - started, 3), error
    return plot, round(time.perf_counter() - started, 3), None


def finish(run_dir: str | Path, timeout: float = BUILD_TIMEOUT, *, record: bool = True) -> None:
    """Wait for the run's background Data Docs (none: nothing to do) and record them in
    the validate step: ``docs_seconds`` (the build's wall time from its job),
    ``docs_waited_seconds`` (what the run waited for it), or ``docs_error``, and the report
    dropped. With ``record`` off (the validate step is still being written) only logs."""
    build = _builds.pop(str(run_dir), None)
    if build is None:
        return
    waiting = time.perf_counter()
    error = None
    try:
        code = build.process.wait(timeout=max(0.0, timeout - (waiting - build.started)))
        if code != 0:
            error = f"the builder exited with status {code}: {_tail(build.log_path)}"
    except subprocess.TimeoutExpired:
        build.process.kill()
        build.process.wait()
        error = f"the builder took over {timeout:.0f} s and was stopped"
    done = time.perf_counter()
    build.log_path.unlink(missing_ok=True)
    if error is not None:
        log.warning("the Data Docs of run %s were not built: %s", run_dir, error)
    if not record:
        return
    manifest = load_manifest(run_dir)
    step = manifest.steps.get("validate")
    if step is not None:
        if build.built_on:
            step["docs_built_on"] = build.built_on
        step["docs_seconds"] = round(done - build.started, 3)
        step["docs_waited_seconds"] = round(done - waiting, 3)
    if error is not None:
        manifest.reports.pop("data_docs", None)
        if step is not None:
            step["docs_error"] = error
    manifest.save()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def build_from_job(job: Path) -> Path | None:
    """The background builder's work: the job written by ``DocsInBackground``."""
    from scoring.validation import PartReport, build_data_docs

    given = json.loads(job.read_text())
    return build_data_docs(
        Path(given["docs_dir"]),
        given["run_name"],
        given["merged"],
        given["success"],
        [PartReport(**r) for r in given["reports"]],
        [PartReport(**r) for r in given["failing"]],
    )


__all__ = [
    "LATER",
    "DocsInBackground",
    "DocsOnCluster",
    "build_from_job",
    "build_later",
    "build_left",
    "finish",
    "on_cluster",
    "prepare",
]


def main() -> None:
    """``python -m jobs.data_docs``: import GX, then build the job named on standard
    input (none: exit); ``python -m jobs.data_docs JOB`` builds JOB at once."""
    from scoring.validation import import_gx

    if len(sys.argv) > 1:
        build_from_job(Path(sys.argv[1]))
        return
    import_gx()
    import scoring.validation.docs  # noqa: F401  # the rest of what a build imports

    line = sys.stdin.readline().strip()
    if line:
        build_from_job(Path(line))


if __name__ == "__main__":
    main()
