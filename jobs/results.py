"""What each step returns: small JSON documents of pointers and counts.

These are what an Airflow task pushes to XCom (so plain, JSON-serialisable dicts) and
what ``batchscore step`` prints; the DAG and the CLI may rely on the keys named here
and on nothing else. Everything else about a run is in its manifest. Final, so that
``"skipped" in result`` tells a ``Skipped`` from the step's own result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NotRequired, TypedDict, final

if TYPE_CHECKING:
    from jobs.canary import CanaryVerdict


class RunRef(TypedDict):
    """A resolved run: its folder and the model version it is pinned to."""

    run_id: str
    run_dir: str
    namespace: str
    model_name: str
    model_version: str


@final
class StartedRun(RunRef):
    """A resolved run as ``jobs.flow`` starts it: the shadow candidate's URI, or None."""

    shadow: str | None


@final
class PlanResult(TypedDict):
    run_dir: str
    shards: int
    rows: int


@final
class ScoreResult(TypedDict):
    run_dir: str
    rows: int
    shards_scored: int
    seconds: float


@final
class ValidateResult(TypedDict):
    run_dir: str
    success: bool
    rows: int


@final
class DriftResult(TypedDict):
    run_dir: str
    passed: bool
    overridden: bool


@final
class ReportsBuilt(TypedDict):
    """The DAG's reports task's result (``jobs.data_docs.build_left``): the run's Data
    Docs index and drift plot (None when one was not made: ``docs_error`` or
    ``plot_error`` says why; no plot when the gate drew it), where and how long."""

    run_dir: str
    index: str | None
    docs_built_on: str
    docs_seconds: float
    docs_waited_seconds: float
    docs_error: NotRequired[str]
    plot: str | None
    plot_seconds: NotRequired[float]
    plot_error: NotRequired[str]


class GateResult(TypedDict):
    """The validate task's result: the GX suite, then the drift gate (``jobs.flow``).

    ``rows`` is None and ``published_earlier`` true when the run was published before
    and nothing was checked again; ``drift_passed`` is None when the gate did not run
    (a shadow run, or one published earlier).
    """

    run_dir: str
    success: bool
    rows: int | None
    published_earlier: bool
    drift_passed: bool | None
    drift_overridden: bool


@final
class ExportResult(TypedDict):
    run_dir: str
    version: int | None
    keys: int | None
    store: str
    shadow_report: NotRequired[str]  # a shadow run's comparison with the live version


@final
class PublishResult(TypedDict):
    run_dir: str
    run_id: str
    namespace: str
    store: str
    model: str  # <name>/<version>
    version: int
    previous: int | None  # the live version before
    note: str
    newly_published: bool  # live now, and not through an earlier publish of this run
    mlflow_run_id: NotRequired[str | None]  # the MLflow run that records it (jobs.flow)
    canary: NotRequired[float | None]  # started as a canary at this share (not live)


class CanarySettled(TypedDict):
    """The end of a staged publish (``jobs.flow.settle_canary``): the check, and whether the
    canary was promoted (then ``published`` is the publish's result) or aborted."""

    verdict: CanaryVerdict
    promoted: bool
    published: PublishResult | None


@final
class Skipped(TypedDict):
    """A step that did nothing, and why (a dry run, a shadow run's publish)."""

    run_dir: str
    skipped: str
