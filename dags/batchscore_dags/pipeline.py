"""The scoring pipeline as a DAG, built by one function for the ad-hoc DAG and every job.

resolve → plan → score → validate (GX suite, then the drift gate) → export → publish, and
beside export and publish, reports (the validate step's GX Data Docs and the drift plot,
made off the run's critical path: ``jobs.data_docs``); a shadow run skips the drift gate, writes its
comparison with the live version after its export, and skips publish. Those rules live
in ``jobs.flow``, which ``batchscore run`` runs too: each task is one call into it (or
into ``jobs.steps``, ``jobs.data_docs``), and this module only translates (a skipped step
→ ``AirflowSkipException``, an out-of-order publish → ``AirflowFailException``, a new
live version → an asset event). XCom carries the step's result (``jobs.results``): the
run folder, ids and counts.

What every DAG built here has:

- a trigger form (``params``) whose defaults come from the job config, validated by
  Airflow (JSON Schema) before the run starts;
- a run id per logical date (``runs.run_key``), so that retries, clears, backfills and
  re-runs of one date are one run that scores nothing twice and publishes nothing twice;
- retries with exponential backoff, except for errors that a retry cannot fix (bad input,
  a failed quality gate, an unknown model), which fail at once (``RETRY_POLICY``);
- the ``batchscore_scoring`` pool on the score task, to bound concurrent scoring runs;
- an ``execution_timeout`` per task when the job sets one (``execution_timeout``, or per
  step ``timeouts``);
- an ``on_failure_callback`` naming the failed step and the error, a mail through the
  job's notifier (``notify``) on a failed step or a blocked gate, and a Deadline Alert
  when the job sets a deadline;
- an asset event on ``batchscore://<namespace>`` (through the ``batchscore_published``
  alias, since the form may change the namespace) when a version goes live.

This module imports ``airflow.sdk`` and the standard library only: the heavy modules are
imported inside the tasks, so parsing the DAG files stays cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from airflow.sdk import (
    DAG,
    Asset,
    AssetAlias,
    CronTriggerTimetable,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    get_current_context,
    task,
)

# isort: split
# Public: airflow.sdk exports them (its __all__ and lazy imports), but its 3.3.2 type stub
# (airflow/sdk/__init__.pyi) leaves them out; a separate import, so that the ignore covers
# these three names only.
from airflow.sdk import (  # type: ignore[attr-defined]
    DeadlineAlert,
    DeadlineReference,
    SyncCallback,
)

from batchscore.core.names import NAMESPACE_PATTERN, NAMESPACE_RULE
from batchscore_dags.callbacks import deadline_missed, on_task_failure
from batchscore_dags.config import (
    DEFAULT_START,
    MODEL_URI_EXPECTED,
    MODEL_URI_PATTERN,
    AssetSchedule,
    CanaryConfig,
    LoadedJob,
    NotifyConfig,
)
from batchscore_dags.notify import JobNotifier
from batchscore_dags.runs import STEPS

if TYPE_CHECKING:
    from airflow.sdk import Context

    from jobs.results import (
        CanarySettled,
        ExportResult,
        GateResult,
        PlanResult,
        PublishResult,
        ReportsBuilt,
        ScoreResult,
        StartedRun,
    )

log = logging.getLogger("batchscore.dag")

SCORING_POOL = "batchscore_scoring"
PUBLISHED = AssetAlias("batchscore_published")
# batchscore.core.names' rule, or empty (the model's name): "^(<rule>)?$".
OPTIONAL_NAMESPACE_PATTERN = f"^({NAMESPACE_PATTERN.removeprefix('^').removesuffix('$')})?$"
OPTIONAL_STORE_PATTERN = r"^((lmdb|redis|rediss|unix)://.*)?$"
# A model URI or an alias of the form's model, or empty (no shadow run).
OPTIONAL_SHADOW_PATTERN = f"^({MODEL_URI_PATTERN.removeprefix('^').removesuffix('$')}|[\\w-]+)?$"

# Retrying cannot fix these; a missing input (InputNotFound) is retried: it may land late.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(exception="scoring.errors.InputNotFound", action=RetryAction.DEFAULT),
        RetryRule(
            exception=[
                "scoring.errors.InputError",
                "scoring.errors.ValidationFailed",
                "scoring.errors.DriftDetected",
                "scoring.errors.QualityConfigError",
                "scoring.errors.UnsupportedModel",
                "registry.errors.RegistryError",
                "kv_export.errors.BadStoreUrl",
                "kv_export.errors.CanaryRefused",  # a canary runs: promote or abort it first
                "batchscore.core.errors.SettingsError",
                "batchscore.core.errors.InvalidName",
                "jobs.errors.RunError",
            ],
            action=RetryAction.FAIL,
            reason="bad input, configuration or output: a retry would fail the same way",
        ),
    ]
)


def namespace_asset(namespace: str) -> Asset:
    """The asset that gets an event whenever a version of ``namespace`` goes live."""
    return Asset(f"batchscore://{namespace}")


@dataclass(frozen=True)
class FormDefaults:
    """The trigger form's defaults: a job config's values, or the ad-hoc DAG's."""

    input_path: str = ""
    model_uri: str = "models:/churn@champion"
    key_column: str = "customer_id"
    namespace: str | None = None
    store_url: str | None = None
    features: list[str] | None = None
    batch_size: int | None = None
    shadow: str | None = None


@dataclass(frozen=True)
class DagSpec:
    """Everything that differs between the DAGs built by ``build_dag``."""

    dag_id: str
    description: str
    doc_md: str
    form: FormDefaults
    schedule: str | AssetSchedule | None = None
    start_date: datetime = DEFAULT_START
    catchup: bool = False
    max_active_runs: int = 1
    owner: str = "batchscore"
    tags: tuple[str, ...] = ()
    retries: int = 1
    retry_delay: timedelta = timedelta(seconds=20)
    max_retry_delay: timedelta = timedelta(hours=1)
    deadline: timedelta | None = None
    # None: Airflow's [core] dags_are_paused_at_creation (the compose stack: paused).
    paused_upon_creation: bool | None = None
    workers: int | None = None
    # Per task id: how long one try may run (execution_timeout); absent: Airflow's default.
    timeouts: dict[str, timedelta] = field(default_factory=dict)
    notify: NotifyConfig | None = None
    # A staged publish: publish as a canary, hold (deferred), check, promote or abort.
    canary: CanaryConfig | None = None


def form_params(d: FormDefaults) -> dict[str, Param]:
    """The trigger form: types, titles, descriptions and validation (JSON Schema)."""
    return {
        "input_path": Param(
            d.input_path,
            type="string",
            minLength=1,
            title="Input path",
            description="A Parquet file or a folder of them (partition folders such as dt=... "
            "too). An Airflow template: {{ ds }} is the run's logical date. A relative path "
            "is under BATCHSCORE_HOME.",
        ),
        "model_uri": Param(
            d.model_uri,
            type="string",
            pattern=MODEL_URI_PATTERN,
            title="Model URI",
            description=f"{MODEL_URI_EXPECTED}; an alias is resolved once, when the run starts.",
        ),
        "key_column": Param(
            d.key_column,
            type="string",
            minLength=1,
            title="Key column",
            description="The column whose value is each prediction's lookup key.",
        ),
        "namespace": Param(
            d.namespace,
            type=["null", "string"],
            pattern=OPTIONAL_NAMESPACE_PATTERN,
            title="Namespace",
            description=f"Keyspace in the store: {NAMESPACE_RULE}. Empty means the registered "
            "model's name (which must then follow the same rule).",
        ),
        "store_url": Param(
            d.store_url,
            type=["null", "string"],
            pattern=OPTIONAL_STORE_PATTERN,
            title="Store URL",
            description="lmdb:///path, redis://host:port/db or redis+cluster://host:port,...; "
            "empty means BATCHSCORE_STORE_URL.",
        ),
        "features": Param(
            ",".join(d.features) if d.features else None,
            type=["null", "string"],
            title="Feature columns",
            description="Comma-separated input columns, for models with a tensor signature.",
        ),
        "batch_size": Param(
            d.batch_size,
            type=["null", "integer"],
            minimum=1,
            title="Batch size",
            description="Rows per forward pass; empty means BATCHSCORE_BATCH_SIZE (default: auto).",
        ),
        "shadow": Param(
            d.shadow,
            type=["null", "string"],
            pattern=OPTIONAL_SHADOW_PATTERN,
            title="Shadow candidate",
            description="A candidate model (an alias of the model above, e.g. challenger, or "
            f"{MODEL_URI_EXPECTED}) scored instead of it: the run writes an unpublished "
            "version and a comparison with the live version, and publishes nothing.",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Score and validate, publish nothing.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force",
            description="Re-score shards whose output parts already exist, and publish even if "
            "the drift gate fails (the override is recorded in the run's manifest).",
        ),
    }


def job_spec(job: LoadedJob) -> DagSpec:
    """A job config as a DAG spec: its values become the form's defaults."""
    c = job.config
    shadow = f"; shadow candidate `{c.candidate}`, nothing is published" if c.shadow else ""
    return DagSpec(
        dag_id=c.dag_id,
        description=c.description or f"Score {c.input_path} with {c.model_uri}{shadow}",
        doc_md=(
            f"Generated from the job config `{job.path}`.\n\n"
            f"Scores `{c.input_path}` (rendered for each logical date) with `{c.model_uri}` "
            f"into namespace `{c.namespace or '(the model name)'}`{shadow}. Trigger it with "
            "the form to change any of these for one run."
        ),
        form=FormDefaults(
            input_path=c.input_path,
            model_uri=c.model_uri,
            key_column=c.key_column,
            namespace=c.namespace,
            store_url=c.store_url,
            features=c.features,
            batch_size=c.batch_size,
            shadow=c.shadow,
        ),
        schedule=c.schedule,
        start_date=c.start_date,
        catchup=c.catchup,
        max_active_runs=c.max_active_runs,
        owner=c.owner,
        tags=("job", *c.tags),
        retries=c.retries,
        retry_delay=c.retry_delay,
        max_retry_delay=c.max_retry_delay,
        deadline=c.deadline,
        workers=c.workers,
        timeouts=c.step_timeouts(STEPS),
        notify=c.notify,
        canary=c.canary,
    )


def build_dag(spec: DagSpec) -> DAG:
    """The pipeline DAG for ``spec``; the tasks are the same for every DAG."""
    with DAG(
        dag_id=spec.dag_id,
        description=spec.description,
        doc_md=spec.doc_md,
        schedule=_schedule(spec.schedule),
        start_date=spec.start_date,
        catchup=spec.catchup,
        max_active_runs=spec.max_active_runs,
        is_paused_upon_creation=spec.paused_upon_creation,
        params=form_params(spec.form),
        tags=sorted({"batchscore", *spec.tags}),
        default_args={
            "owner": spec.owner,
            "retries": spec.retries,
            "retry_delay": spec.retry_delay,
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": spec.max_retry_delay,
            "retry_policy": RETRY_POLICY,
            "on_failure_callback": _failure_callbacks(spec.notify),
        },
        deadline=_deadline(spec),
    ) as built:
        _wire_tasks(spec.workers, spec.timeouts, spec.canary)
    return built


def _failure_callbacks(notify: NotifyConfig | None) -> list[Any]:
    """The log line always; a mail too when the job asks for one."""
    if notify is None:
        return [on_task_failure]
    notifier = JobNotifier(
        events=notify.when,
        to=notify.smtp.to,
        from_email=notify.smtp.from_,
        conn_id=notify.smtp.conn_id,
    )
    return [on_task_failure, notifier]


def _schedule(schedule: str | AssetSchedule | None) -> Any:
    """Cron strings run on Airflow 3's trigger timetable: the logical date is the tick."""
    if isinstance(schedule, AssetSchedule):
        return [Asset(schedule.asset)]
    if schedule is None or schedule == "@once":
        return schedule
    return CronTriggerTimetable(schedule, timezone="UTC")


def _deadline(spec: DagSpec) -> DeadlineAlert | None:
    if spec.deadline is None:
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=spec.deadline,
        callback=SyncCallback(deadline_missed, kwargs={"job": spec.dag_id}),
    )


def _wire_tasks(
    workers: int | None, timeouts: dict[str, timedelta], canary: CanaryConfig | None = None
) -> None:
    """One task per step of ``jobs.flow``; XCom carries its result (``jobs.results``),
    each key also as an XCom of its own (the results' types are imported for type
    checking only, so Airflow cannot infer ``multiple_outputs`` from them).

    A step without a timeout is given none, rather than ``execution_timeout=None``, so
    that Airflow's ``[core] default_task_execution_timeout`` still applies to it.
    """

    def limits(step: str) -> dict[str, Any]:
        return {"execution_timeout": timeouts[step]} if step in timeouts else {}

    @task(multiple_outputs=True, **limits("resolve"))
    def resolve() -> StartedRun:
        return resolve_run(get_current_context(), workers)

    @task(multiple_outputs=True, **limits("plan"))
    def plan(ref: StartedRun) -> PlanResult:
        from jobs import flow

        return flow.plan(ref["run_dir"])

    @task(pool=SCORING_POOL, multiple_outputs=True, **limits("score"))
    def score(planned: PlanResult) -> ScoreResult:
        from jobs import flow

        def progress(done: int, total: int, rows: int) -> None:
            log.info("scored %d/%d shards, %d rows", done, total, rows)

        return flow.score(planned["run_dir"], on_progress=progress)

    @task(multiple_outputs=True, **limits("validate"))
    def validate(scored: ScoreResult) -> GateResult:
        from jobs import flow

        # A passing run's Data Docs and drift plot are made by the reports task
        # (docs_later), beside the export and the publish, rather than this task waiting
        # seconds for GX and matplotlib.
        return flow.validate_and_gate(scored["run_dir"], docs_later=True)

    @task(multiple_outputs=True, **limits("export"))
    def export(validated: GateResult) -> ExportResult:
        return export_run(validated["run_dir"])

    # Part of the validate step (its reports), so under its timeout.
    @task(multiple_outputs=True, **limits("validate"))
    def reports(validated: GateResult) -> ReportsBuilt:
        return reports_run(validated["run_dir"])

    @task(outlets=[PUBLISHED], multiple_outputs=True, **limits("publish"))
    def publish(exported: ExportResult) -> PublishResult:
        return publish_run(exported["run_dir"], get_current_context(), canary)

    # Each task receives the upstream task's XCom value; here the calls wire XComArgs.
    validated = validate(score(plan(resolve())))  # type: ignore[arg-type]
    published = publish(export(validated))  # type: ignore[arg-type]
    reports(validated)  # type: ignore[arg-type]
    if canary is not None:
        _wire_canary(published, canary, limits("publish"))


def _wire_canary(published: Any, canary: CanaryConfig, limits: dict[str, Any]) -> None:
    """After a canary publish: ``hold`` waits in the triggerer (deferred: no worker slot)
    until the time the publish task named, then ``settle_canary`` checks the canary and
    promotes it (an asset event, as a publish) or aborts it (the task fails: the run did
    not go live, as when a quality gate blocks it)."""
    from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync

    hold = DateTimeSensorAsync(
        task_id="hold_canary",
        target_time="{{ ti.xcom_pull(task_ids='publish', key='hold_until') }}",
        retries=0,
    )

    @task(outlets=[PUBLISHED], multiple_outputs=True, **limits)
    def settle_canary(run_dir: str) -> CanarySettled:
        return settle_run(run_dir, get_current_context(), canary)

    published >> hold >> settle_canary(published["run_dir"])


def resolve_run(context: Context, workers: int | None) -> StartedRun:
    """The form's values (rendered for the logical date) → a pinned run in its folder."""
    from batchscore.core.settings import RunSettings, load_settings
    from batchscore_dags.runs import data_as_of, render_input_path, run_key
    from jobs import flow, steps
    from jobs.shadow import candidate_uri

    params = context["params"]
    dag_run = context["dag_run"]
    settings = load_settings(RunSettings)
    features = [f.strip() for f in (params.get("features") or "").split(",") if f.strip()]
    run_params = steps.make_params(
        settings,
        input_path=render_input_path(params["input_path"], context, settings.home),
        model_uri=params["model_uri"],
        key_column=params["key_column"],
        namespace=params.get("namespace"),
        store_url=params.get("store_url"),
        batch_size=params.get("batch_size"),
        workers=workers,
        features=features or None,
        dry_run=params.get("dry_run", False),
        force=params.get("force", False),
        data_as_of=data_as_of(dag_run.logical_date),
    )
    candidate = candidate_uri(params["model_uri"], params.get("shadow"))
    key = run_key(context["dag"].dag_id, dag_run.run_id, dag_run.logical_date, candidate)
    ref = flow.start_run(settings, run_params, run_id=key, shadow=candidate)
    log.info("input %s; run folder %s", run_params.input_path, ref["run_dir"])
    return ref


def export_run(run_dir: str) -> ExportResult:
    """``jobs.flow.export_and_compare``; a skipped export (a dry run) skips the task."""
    from airflow.sdk.exceptions import AirflowSkipException

    from jobs import flow

    result = flow.export_and_compare(run_dir)
    if "skipped" in result:
        raise AirflowSkipException(f"export skipped: {result['skipped']}")
    return result


def reports_run(run_dir: str) -> ReportsBuilt:
    """``jobs.data_docs.build_left``: the Data Docs and the drift plot the validate task
    left for this task; none left (the validate task made them) skips it. A report that
    failed is a warning in the log and ``docs_error`` or ``plot_error`` in the result,
    not a failed task: the verdict stands, and the version is published either way."""
    from airflow.sdk.exceptions import AirflowSkipException

    from jobs import data_docs

    built = data_docs.build_left(run_dir)
    if built is None:
        raise AirflowSkipException("no reports left to make: the validate task made them")
    return built


def publish_run(
    run_dir: str, context: Context, canary: CanaryConfig | None = None
) -> PublishResult:
    """``jobs.flow.publish_run``; announce a new live version as an asset event. With a
    canary, start the version as one instead and name (XCom ``hold_until``) when it is
    checked.

    A version older than the newest published is refused without retries (retrying
    cannot make it newer); the error says how to publish it anyway. A skipped publish
    (a dry run, a shadow run) skips the task.
    """
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from jobs import flow
    from kv_export.errors import VersionExpired, VersionOutOfOrder

    try:
        result = flow.publish_run(run_dir, canary=canary.percent if canary else None)
    except (VersionOutOfOrder, VersionExpired) as exc:
        raise AirflowFailException(str(exc)) from exc
    if "skipped" in result:
        raise AirflowSkipException(f"publish skipped: {result['skipped']}")
    if canary is not None:
        started = datetime.now(UTC) if result.get("canary") is not None else None
        # A run published earlier holds nothing: the check finds no canary of it.
        until = (started + canary.hold) if started else datetime.now(UTC)
        context["ti"].xcom_push(key="hold_until", value=until.isoformat())
    _announce(result, context)
    return result


def settle_run(run_dir: str, context: Context, canary: CanaryConfig) -> CanarySettled:
    """``jobs.flow.settle_canary``: promoted, an asset event; aborted, the task fails
    without retries (the check would fail the same way); a run whose version is no longer
    the canary (promoted or aborted by hand, or published earlier) has nothing to settle."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from jobs import flow
    from jobs.canary import CanaryRules
    from kv_export.errors import CanaryRefused

    rules = cast("CanaryRules", canary.rules())
    try:
        settled = flow.settle_canary(run_dir, rules)
    except CanaryRefused as exc:
        raise AirflowSkipException(f"nothing to settle: {exc}") from exc
    if not settled["promoted"]:
        reasons = "; ".join(settled["verdict"]["reasons"])
        raise AirflowFailException(
            f"canary version {settled['verdict']['version']} of namespace "
            f"{settled['verdict']['namespace']} aborted: {reasons}"
        )
    assert settled["published"] is not None
    _announce(settled["published"], context)
    return settled


def _announce(result: PublishResult, context: Context) -> None:
    if result["newly_published"]:
        context["outlet_events"][PUBLISHED].add(
            namespace_asset(result["namespace"]),
            extra={
                "namespace": result["namespace"],
                "version": result["version"],
                "run_id": result["run_id"],
                "model": result["model"],
            },
        )
