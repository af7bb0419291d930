"""The ``batchscore`` command line: the same ``jobs`` functions that the Airflow DAG calls.

Exit codes are one table (``ExitCode``) and one function (``exit_code``): every command
fails through ``_fail`` and an error no command expected goes through ``_Cli.__call__``,
so a script can tell "fix the command" (3) from "look at the data" (4) from "retry
later" (5). ``batchscore --help`` shows the table.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from batchscore.core.errors import BatchscoreError, InvalidName, SettingsError
from batchscore.core.settings import SCHEDULER_SCHEMES, ApiSettings, RunSettings, load_settings

if TYPE_CHECKING:
    from jobs.manifest import RunParams

log = logging.getLogger("batchscore.cli")


class ExitCode(IntEnum):
    """What a command's exit status tells a script, by what the user has to do next."""

    OK = 0
    FAILED = 1  # anything else: look at the error (a run that ended unpublished is here)
    USAGE = 2  # the command line itself: an unknown option, a value of the wrong form
    BAD_INPUT = 3  # what the command names: fix the input, model, name, setting or config
    GATE = 4  # a quality gate held the output back: look at the data or the model
    UNAVAILABLE = 5  # the store, the registry or the Dask cluster did not answer: retry


EXIT_CODES_HELP = "\n\n".join(
    [
        "Exit codes:",
        "0 ok;",
        "1 failed: a run that finished unpublished, a shard that could not be scored, an "
        "unexpected error;",
        "2 usage: an unknown option, a value of the wrong form;",
        "3 bad input: the input data, a model, version, alias, namespace, setting, store "
        "URL, job config or run folder the command names;",
        "4 a quality gate held the output back: validation, drift, a feature's null rate;",
        "5 unavailable: the store, the MLflow registry or the Dask cluster did not answer.",
        "BATCHSCORE_LOG_FORMAT=json: logs as one JSON object per line on stderr.",
    ]
)


def exit_code(exc: BaseException) -> ExitCode:
    """The exit code of an error: the one mapping every command uses.

    TooManyNulls is an input error by its class but a gate by what the user does: the
    input broke the quality rule ``max_feature_null_rate`` (or the quality config's),
    and the fix is the data or the rule, not the command. A failure that is not a
    batchscore error counts as unavailable when a refused or timed-out connection is
    behind it (MLflow wraps its HTTP client's, Dask raises OSError); else it is 1.
    """
    from jobs.errors import RunError
    from kv_export.errors import StoreError, StoreUnavailable
    from registry.errors import RegistryError
    from scoring.errors import (
        DriftDetected,
        InputError,
        QualityConfigError,
        TooManyNulls,
        UnsupportedModel,
        ValidationFailed,
    )

    if isinstance(exc, StoreUnavailable):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ValidationFailed | DriftDetected | TooManyNulls):
        return ExitCode.GATE
    bad_input = (InputError, InvalidName, SettingsError, StoreError, RegistryError, RunError)
    if isinstance(exc, bad_input + (UnsupportedModel, QualityConfigError, *_dag_errors())):
        return ExitCode.BAD_INPUT
    if isinstance(exc, BatchscoreError):
        return ExitCode.FAILED
    return ExitCode.UNAVAILABLE if _unreachable(exc) else ExitCode.FAILED


def _dag_errors() -> tuple[type[BaseException], ...]:
    """``JobConfigError`` when the DAG package is loaded (only ``run -f`` loads it)."""
    loaded = sys.modules.get("batchscore_dags.errors")
    return (loaded.JobConfigError,) if loaded is not None else ()


def _unreachable(exc: BaseException) -> bool:
    """A refused, reset or timed-out connection anywhere in the error's chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        name = f"{type(current).__module__}.{type(current).__name__}"
        if name in ("requests.exceptions.ConnectionError", "requests.exceptions.Timeout"):
            return True
        if type(current) is OSError and "connect" in str(current).lower():
            return True  # distributed: "Timed out trying to connect to tcp://..."
        current = current.__cause__ or current.__context__
    return False


class _Cli(typer.Typer):
    """The app, whose unexpected errors exit by ``exit_code`` too: an unreachable
    service with one ``error:`` line and 5; anything else with its traceback and 1
    (a JSON log line carrying the traceback under BATCHSCORE_LOG_FORMAT=json)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            code = exit_code(exc)
            if code == ExitCode.FAILED and not _logs["json"]:
                raise
            _report(exc, code)
            sys.exit(code)
        finally:
            if kwargs.get("standalone_mode", True):
                _quick_exit()


def _quick_exit() -> None:
    """The process ends now (click exits in standalone mode): what torch, MLflow, GX and
    the run loaded dies with it, so its exit need not walk all of it in a last garbage
    collection, seconds of a short run's wall clock (as a Dask worker's exit skips it,
    ``scoring.engine.QuickExit``)."""
    import gc

    gc.freeze()


app = _Cli(
    help="Batch scoring on Airflow, MLflow, Dask and a KV store.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
)
model_app = typer.Typer(
    help="The MLflow model registry: register, promote, list.", no_args_is_help=True
)
step_app = typer.Typer(
    help="Run one pipeline step, as one task of the DAG: resolve creates the run folder, "
    "the others work on it.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")
app.add_typer(step_app, name="step")
console = Console(stderr=True)
out = Console()
_logs = {"json": False}  # set once by _setup_logging: how errors are reported


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"batchscore {version('batchscore')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Batch scoring on Airflow, MLflow, Dask and a KV store."""


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


CLUSTERS = ("local", "processes", "cuda", "auto")


def _cluster_value(value: str) -> str:
    if value in CLUSTERS or value.startswith(SCHEDULER_SCHEMES):
        return value
    raise typer.BadParameter(
        f"{value!r} is not one of local, processes, cuda, auto, or a running scheduler's address "
        "(tcp://HOST:PORT or tls://HOST:PORT)"
    )


def _complete_cluster(incomplete: str) -> list[str]:
    return [c for c in (*CLUSTERS, "tcp://") if c.startswith(incomplete)]


StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="KV store URL: lmdb:///path, redis://host:port/db or "
        "redis+cluster://host:port,host:port (default: setting).",
    ),
]
OutputOpt = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table: for people; json: one stable document for scripts.",
    ),
]
JsonFlag = Annotated[
    bool, typer.Option("--json", hidden=True, help="Same as -o json (kept for scripts).")
]
VerboseOpt = Annotated[bool, typer.Option(help="Debug logs of batchscore's own modules.")]
RunDirArg = Annotated[Path, typer.Argument(help="The run folder (step resolve prints it).")]


def _namespace_value(value: str | None) -> str | None:
    """The edge check of a namespace (batchscore.core.names' rule), before anything is opened."""
    from batchscore.core.names import NAMESPACE_RULE, is_namespace

    if value is None or is_namespace(value):
        return value
    shown = repr(value) if len(value) <= 60 else f"{value[:40]!r}… ({len(value)} characters)"
    raise typer.BadParameter(f"{shown} is not a namespace; expected {NAMESPACE_RULE}")


NamespaceArg = Annotated[
    str,
    typer.Argument(metavar="NAMESPACE", callback=_namespace_value, help="Keyspace in the store."),
]


def _percent_value(value: str | None) -> float | None:
    """A canary's share: ``10%``, ``10`` or ``2.5%``, strictly between 0 and 100."""
    from kv_export.errors import BadCanaryPercent
    from kv_export.state import canary_percent

    if value is None:
        return None
    text = value.strip().removesuffix("%").strip()
    try:
        return canary_percent(float(text))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a percentage such as 10%") from None
    except BadCanaryPercent as exc:
        raise typer.BadParameter(str(exc)) from None


CanaryOpt = Annotated[
    str | None,
    typer.Option(
        metavar="P%",
        help="Publish as a canary: the version answers P % of the keys (by a stable hash of "
        "the key) beside the live version, which stays live; batchscore canary NAMESPACE "
        "--promote or --abort ends it.",
    ),
]


def _setup_logging(log_format: str = "text", verbose: bool = False) -> None:
    """Text through rich, or JSON lines (``batchscore.core.logs``), on stderr.

    For JSON, MLflow is told not to install a handler of its own nor to draw its
    download progress bar, Dask's logging is set up first, and the workers of a cluster
    started for the run preload the same setup, so that their lines come out as JSON too.
    """
    import os

    from batchscore.core import logs

    level = logging.DEBUG if verbose else logging.INFO
    if log_format != "json":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console, show_path=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm's
        # The workers of a cluster started here inherit the environment: they preload
        # the same setup (a running tcp:// cluster's workers log as they were started).
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PRELOAD", '["batchscore.core.logs"]')
        import distributed  # noqa: F401  (installs its handlers, which configure() removes)

        handler = logs.json_handler()
        _logs["json"] = True
    logs.configure(handler, level=level, loggers=logs.PROJECT_LOGGERS, quiet=logs.NOISY_LOGGERS)


def _report(exc: BaseException, code: int) -> None:
    """The one ``error:`` line (a JSON log line with BATCHSCORE_LOG_FORMAT=json)."""
    if _logs["json"]:
        known = exc.to_dict() if isinstance(exc, BatchscoreError) else None
        fields = {"error": type(exc).__name__, "exit_code": int(code)}
        log.error(
            "error: %s",
            exc if known else f"{type(exc).__name__}: {exc}",
            exc_info=None if known or code != ExitCode.FAILED else exc,
            extra={"fields": fields},
        )
        return
    # No wrapping and no markup: the message is one greppable line, brackets included.
    shown = str(exc) if isinstance(exc, BatchscoreError) else f"{type(exc).__name__}: {exc}"
    console.print(f"[bold red]error:[/] {escape(shown)}", soft_wrap=True, highlight=False)


def _fail(exc: BaseException) -> NoReturn:
    code = exit_code(exc)
    _report(exc, code)
    raise typer.Exit(code)


def _print_json(document: object) -> None:
    """A document for scripts: plain JSON on stdout, nothing else on that stream."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _as_json(output: OutputFormat, json_flag: bool) -> bool:
    return json_flag or output == OutputFormat.json


def _run_settings(**overrides: Any) -> RunSettings:
    try:
        return load_settings(RunSettings, **overrides)
    except BatchscoreError as exc:
        _fail(exc)


# The options of a run, shared by `run` and `step resolve` (both start a run).
InputOpt = Annotated[
    str | None,
    typer.Option("--input", help="Parquet file or folder (partition folders too)."),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="models:/name@alias or models:/name/N")
]
KeyColumnOpt = Annotated[
    str | None, typer.Option("--key-column", help="Column with each row's key.")
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(help="Keyspace; default: the model's name.", callback=_namespace_value),
]
RunsRootOpt = Annotated[
    str | None, typer.Option("--output", help="Root of run folders: a path or an s3:// URL.")
]
BatchSizeOpt = Annotated[
    str | None, typer.Option(help="Rows per forward pass, or 'auto' (the largest that fits).")
]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Dask worker processes.")]
ClusterOpt = Annotated[
    str | None,
    typer.Option(
        metavar="[local|processes|cuda|auto|tcp://HOST:PORT]",
        parser=_cluster_value,
        shell_complete=lambda ctx, param, incomplete: _complete_cluster(incomplete),
        help="local (in this process: a thread per shard scored at once), processes (a "
        "LocalCluster of worker processes), cuda (dask-cuda), auto (cuda on a GPU machine), "
        "or a running scheduler's tcp:// address.",
    ),
]
DashboardOpt = Annotated[
    bool | None,
    typer.Option(
        "--dashboard/--no-dashboard",
        help="The Dask dashboard of the cluster started for the run (default: setting; "
        "unset: off for local, on for processes and cuda).",
    ),
]
DeviceOpt = Annotated[
    Device | None, typer.Option(help="Where workers run the model (auto: their GPU if any).")
]
PrecisionOpt = Annotated[
    Precision | None, typer.Option(help="Autocast precision of the forward pass.")
]
MaxFailedOpt = Annotated[
    int | None, typer.Option(min=0, help="Shards allowed to fail; their rows are left out.")
]
FeaturesOpt = Annotated[
    str | None, typer.Option(help="Comma-separated feature columns (tensor-signature models).")
]
ShardRowsOpt = Annotated[int | None, typer.Option(min=1, help="Target rows per shard.")]
RunIdOpt = Annotated[
    str | None,
    typer.Option(help="Run id; default: derived from the inputs (with -f: the DAG run's)."),
]
DryRunOpt = Annotated[bool, typer.Option(help="Score and validate; publish nothing.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        help="Re-score shards whose parts exist, and publish past a failing drift gate "
        "(the override is recorded in the manifest)."
    ),
]
ShadowOpt = Annotated[
    str | None,
    typer.Option(
        help="Score this candidate instead (an alias of --model's model, e.g. challenger, "
        "or a model URI): export it unpublished and compare it with the live version."
    ),
]
JobFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        exists=True,
        dir_okay=False,
        help="A job config (dags/jobs/*.yaml): run what its DAG runs for --date, outside "
        "Airflow. Options given here override its fields.",
    ),
]
DateOpt = Annotated[
    str | None,
    typer.Option(
        help="With -f: the logical date, YYYY-MM-DD (midnight UTC) or an ISO timestamp; "
        "default: today (UTC)."
    ),
]


class _RunRequest:
    """What starts a run, from the command line or from a job config (-f) replayed for a
    date as its DAG would run it: the settings, the parameters, the run id and shadow."""

    def __init__(
        self,
        settings: RunSettings,
        params: RunParams,
        run_id: str | None,
        shadow: str | None,
    ) -> None:
        self.settings, self.params, self.run_id, self.shadow = settings, params, run_id, shadow


def _run_request(
    *,
    job_file: Path | None,
    date: str | None,
    input: str | None,
    model: str | None,
    key_column: str | None,
    namespace: str | None,
    store: str | None,
    features: str | None,
    shard_rows: int | None,
    run_id: str | None,
    dry_run: bool,
    force: bool,
    shadow: str | None,
    settings: Mapping[str, Any],
    log_verbose: bool,
) -> _RunRequest:
    if date is not None and job_file is None:
        raise typer.BadParameter("--date needs a job config (-f)", param_hint="--date")
    job = _load_job(job_file) if job_file else None
    run_settings = _run_settings(
        store_url=store or (job.store_url if job else None),
        **{k: v for k, v in settings.items() if v is not None},
        **(_job_settings(job, settings) if job else {}),
    )
    _setup_logging(run_settings.log_format, log_verbose)
    given = {"--input": input, "--model": model, "--key-column": key_column}
    if job is None:
        for name, value in given.items():
            if value is None:
                raise typer.BadParameter(
                    "missing: give --input, --model and --key-column, or a job config (-f)",
                    param_hint=name,
                )
    try:
        from jobs.steps import make_params

        replay = _Replay(job, date, run_settings.home, model, shadow) if job else None
        params = make_params(
            run_settings,
            input_path=input or (replay.input_path if replay else None),
            model_uri=model or (job.model_uri if job else None),
            key_column=key_column or (job.key_column if job else None),
            namespace=namespace or (job.namespace if job else None),
            shard_rows=shard_rows,
            features=_features(features) or (job.features if job else None),
            dry_run=dry_run,
            force=force,
            data_as_of=replay.data_as_of if replay else None,
        )
    except BatchscoreError as exc:
        _fail(exc)
    return _RunRequest(
        run_settings,
        params,
        run_id or (replay.run_key if replay else None),
        shadow or (job.shadow if job else None),
    )


def _features(value: str | None) -> list[str] | None:
    return [f.strip() for f in value.split(",") if f.strip()] if value else None


def _job_settings(job: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """The job config's settings where the command line gave none."""
    fields = {"workers": job.workers, "batch_size": job.batch_size}
    return {k: v for k, v in fields.items() if v is not None and given.get(k) is None}


def _load_job(path: Path) -> Any:
    """The job config, read and checked by the DAGs' own loader (``batchscore_dags``)."""
    _find_dag_package(path)
    from batchscore_dags.config import load_job
    from batchscore_dags.errors import JobConfigError

    try:
        return load_job(path)
    except JobConfigError as exc:
        _fail(exc)


def _find_dag_package(job_file: Path) -> None:
    """Put the DAGs folder on ``sys.path``, as Airflow does, if ``batchscore_dags`` is not
    importable yet: the job file's folder or the one above it (``dags/jobs/x.yaml``),
    else this checkout's ``dags/``."""
    import importlib.util

    if importlib.util.find_spec("batchscore_dags") is not None:
        return
    here = job_file.resolve().parent
    candidates = (here, here.parent, Path(__file__).resolve().parents[1] / "dags")
    for folder in candidates:
        if (folder / "batchscore_dags" / "__init__.py").is_file():
            sys.path.insert(0, str(folder))
            return
    _fail(
        BatchscoreError(
            f"Cannot read job config {job_file}: the DAGs' package batchscore_dags is not "
            "installed here",
            expected="a job config in the DAGs folder (dags/jobs/), beside dags/batchscore_dags",
            found=f"no batchscore_dags in {', '.join(str(c) for c in candidates)}",
            fix="Run from the batchscore checkout or image, or give the run's options instead",
        )
    )


class _Replay:
    """A job config's run for one logical date, as its DAG makes it: the input path
    rendered (``batchscore_dags.runs.render_input_path``), the run id (``run_key``) and
    the data's date (``data_as_of``) of a run triggered with that logical date, as
    ``airflow dags test <dag> <date>`` does (data interval: the logical date itself)."""

    def __init__(
        self, job: Any, date: str | None, home: Path, model: str | None, shadow: str | None
    ) -> None:
        from batchscore_dags.runs import data_as_of, render_input_path, run_key

        from jobs.shadow import candidate_uri

        when = _logical_date(date)
        dag_run_id = f"manual__{when.isoformat()}"
        self.input_path = render_input_path(job.input_path, _context(job, when, dag_run_id), home)
        candidate = candidate_uri(model or job.model_uri, shadow or job.shadow)
        self.run_key = run_key(job.dag_id, dag_run_id, when, candidate)
        self.data_as_of = data_as_of(when)
        log.info("job %s for %s: input %s, run %s", job.name, when, self.input_path, self.run_key)


def _logical_date(value: str | None) -> datetime:
    if value is None:
        today = datetime.now(UTC).date()
        return datetime(today.year, today.month, today.day, tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date; expected YYYY-MM-DD or an ISO timestamp such as "
            "2026-11-20T03:00:00+00:00",
            param_hint="--date",
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _context(job: Any, when: datetime, dag_run_id: str) -> Any:
    """The names an input path template may use (``runs.TEMPLATE_NAMES``) for a run
    triggered with logical date ``when``."""
    from types import SimpleNamespace

    return {
        "dag": SimpleNamespace(dag_id=job.dag_id),
        "dag_run": SimpleNamespace(run_id=dag_run_id, logical_date=when),
        "ds": when.strftime("%Y-%m-%d"),
        "ds_nodash": when.strftime("%Y%m%d"),
        "ts": when.isoformat(),
        "ts_nodash": when.strftime("%Y%m%dT%H%M%S"),
        "logical_date": when,
        "data_interval_start": when,
        "data_interval_end": when,
        "run_id": dag_run_id,
    }


@app.command()
def run(
    input: InputOpt = None,
    model: ModelOpt = None,
    key_column: KeyColumnOpt = None,
    namespace: NamespaceOpt = None,
    store: StoreOpt = None,
    output: RunsRootOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    cluster: ClusterOpt = None,
    dashboard: DashboardOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    max_failed_shards: MaxFailedOpt = None,
    features: FeaturesOpt = None,
    shard_rows: ShardRowsOpt = None,
    run_id: RunIdOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    shadow: ShadowOpt = None,
    job_file: JobFileOpt = None,
    date: DateOpt = None,
    canary: CanaryOpt = None,
    summary_json: Annotated[
        Path | None, typer.Option(help="Write the run summary here (JSON).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole pipeline: resolve, plan, score, validate, drift gate, export, publish.

    --input, --model and --key-column, or a job config (-f) that gives them. With
    --shadow, a shadow run: no drift gate, no publish; the comparison report's path is
    printed last. A run that finishes without publishing (not a dry run) exits 1.
    """
    request = _run_request(
        job_file=job_file,
        date=date,
        input=input,
        model=model,
        key_column=key_column,
        namespace=namespace,
        store=store,  # a password in it moves to the settings, never to the manifest
        features=features,
        shard_rows=shard_rows,
        run_id=run_id,
        dry_run=dry_run,
        force=force,
        shadow=shadow,
        settings={
            "output_dir": output,
            "batch_size": batch_size,
            "cluster": cluster,
            "dashboard": dashboard,
            "device": device.value if device else None,
            "precision": precision.value if precision else None,
            "max_failed_shards": max_failed_shards,
            "workers": workers,
        },
        log_verbose=verbose,
    )
    share = _percent_value(canary)
    if share is not None:
        request.params = request.params.model_copy(update={"canary_percent": share})
    from jobs.flow import run_flow

    try:
        with _score_progress() as on_progress:
            manifest = run_flow(
                request.settings,
                request.params,
                run_id=request.run_id,
                shadow=request.shadow,
                on_progress=on_progress,
                on_dashboard=_show_dashboard,
            )
    except BatchscoreError as exc:
        _write_summary_of_failure(summary_json, exc)
        _fail(exc)
    summary = manifest.summary()
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    if summary["shadow"]:
        report = summary["reports"].get("shadow_comparison")
        out.print(f"shadow comparison report: file://{report}", soft_wrap=True, highlight=False)
        return
    canaried = manifest.steps.get("publish", {}).get("canary") is not None
    if not manifest.published and not request.params.dry_run and not canaried:
        raise typer.Exit(ExitCode.FAILED)


def _write_summary_of_failure(path: Path | None, exc: BatchscoreError) -> None:
    if path:
        path.write_text(json.dumps({"published": False, "error": exc.to_dict()}, indent=2))


def _show_dashboard(link: str) -> None:
    """The Dask dashboard's link, on its own line as soon as the cluster is up (beside the
    progress bar, on stderr); with JSON logs, the score step's log line carries it."""
    if not _logs["json"]:
        console.print(f"Dask dashboard: {link}", soft_wrap=True, highlight=False)


class _score_progress:
    """A live progress bar for the score step: shards done, rows, rows/s; with JSON logs,
    a log line per shard instead (as the DAG's score task logs it)."""

    def __enter__(self) -> Callable[[int, int, int], None]:
        if _logs["json"]:
            return self._log
        self._progress = Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards · {task.fields[rows]:,} rows · {task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._started = 0.0
        return self._update

    @staticmethod
    def _log(done: int, total: int, rows: int) -> None:
        log.info("scored %d/%d shards, %d rows", done, total, rows)

    def _update(self, done: int, total: int, rows: int) -> None:
        import time

        if self._task is None:
            self._progress.start()
            self._started = time.perf_counter()
            self._task = self._progress.add_task("score", total=total, rows=0, rate="")
        elapsed = time.perf_counter() - self._started
        rate = f"{rows / elapsed:,.0f} rows/s" if elapsed > 0.5 else ""
        self._progress.update(self._task, completed=done, rows=rows, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if not _logs["json"]:
            self._progress.stop()


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run_id']}", show_header=True)
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("note")
    for step, details in summary["steps"].items():
        seconds = details.get("seconds")
        note = details.get("note") or details.get("skipped") or ""
        if step == "score" and details.get("rows_per_second"):
            note = f"{details['rows_per_second']:,.0f} rows/s"
        if step == "export" and details.get("version") is not None:
            note = f"version {details['version']}"
        if step == "validate" and summary.get("validation"):
            checked = summary["validation"]
            note = f"{checked['expectations'] - checked['failed']}/{checked['expectations']} passed"
        table.add_row(
            step,
            f"{seconds:.2f}" if isinstance(seconds, int | float) else "",
            f"{details['rows']:,}" if isinstance(details.get("rows"), int) else "",
            str(note),
        )
    out.print(table)
    model = summary["model"]
    state = (
        "published"
        if summary["published"]
        else ("dry run" if summary.get("dry_run") else "NOT published")
    )
    if summary.get("shadow"):
        state = f"shadow run of {escape(summary['shadow'])}, not published"
    elif not summary["published"] and summary["steps"].get("publish", {}).get("canary"):
        state = f"canary at {summary['steps']['publish']['canary']:g} %, not live"
    # Which serialization ran: a pickle means code from the registry ran on the workers.
    loaded = f" · serialization {model['serialization']}" if model.get("serialization") else ""
    out.print(
        f"namespace [bold]{summary['namespace']}[/] · model {model['name']} v{model['version']}"
        f"{loaded} · "
        f"{summary['rows']:,} rows · version {summary['version']} [bold]{state}[/]"
        + (f" in {escape(summary['store'])}" if summary.get("store") else ""),
        soft_wrap=True,
    )
    for label, record in (summary.get("stores") or {}).items():
        if label != summary.get("store"):
            went = "published" if record["published"] else "exported, not published"
            out.print(f"  also {went} in {escape(label)}: version {record['version']}")
    _print_drift(summary.get("drift"))
    for name, path in (summary.get("reports") or {}).items():
        out.print(f"{name}: file://{path}", soft_wrap=True, highlight=False)


def _print_drift(drift: dict[str, Any] | None) -> None:
    if not drift or not drift.get("outputs"):
        return
    table = Table(title=f"drift against live version {drift['live_version']}")
    for column in ("output", "metric", "distance", "max", "moved", "max moved", "state"):
        table.add_column(column)
    for row in drift["outputs"]:
        state = "DRIFTED" if row["drifted"] else "ok"
        if row["drifted"] and drift.get("overridden"):
            state = "FORCED"  # drifted, published by --force
        table.add_row(
            row["output"],
            row["metric"],
            f"{row['distance']:.3f}",
            f"{row['max_distance']:g}",
            f"{row['moved_share']:.1%}",
            f"{row['max_moved_share']:.1%}",
            state,
        )
    out.print(table)


@app.command()
def serve(
    store: StoreOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default: setting).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default: setting).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="uvicorn worker processes.")
    ] = None,
) -> None:
    """Serve the lookup API (FastAPI on uvicorn)."""
    import os

    import uvicorn

    from lookup.app import create_app
    from lookup.observability import shared_metrics_for_workers

    try:
        settings = load_settings(
            ApiSettings, store_url=store, host=host, port=port, api_workers=workers
        )
        if settings.log_format == "json":
            _setup_logging("json")
        application = create_app(settings)  # fails here, before binding, on a bad setting
    except BatchscoreError as exc:
        _fail(exc)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
    }
    if settings.log_format == "json":
        common["log_config"] = None  # uvicorn's loggers propagate to the JSON handler
    if settings.api_workers == 1:
        uvicorn.run(application, **common)
        return
    # Workers are separate processes that build the app from the cached get_settings(),
    # i.e. from the environment: hand them the command-line overrides through it.
    overrides = {
        "STORE_URL": settings.resolved_store_url,
        "HOST": settings.host,
        "PORT": str(settings.port),
        "API_WORKERS": str(settings.api_workers),
    }
    if settings.store_password:  # it came out of --store's URL: the workers need it too
        overrides["STORE_PASSWORD"] = settings.store_password
    os.environ.update({f"BATCHSCORE_{name}": value for name, value in overrides.items()})
    # One scrape of /metrics must show every worker: their metrics go to shared files.
    with shared_metrics_for_workers():
        uvicorn.run("lookup.app:create_app", factory=True, workers=settings.api_workers, **common)


@app.command()
def rollback(
    namespace: NamespaceArg,
    to: Annotated[
        int | None, typer.Option(help="Version to make live; default: the previous.")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Make the previous kept version (or --to VERSION) live again."""
    settings = _run_settings()
    try:
        opened = _open_store(settings, store)
        before = opened.state(namespace).live
        info = opened.rollback(namespace, to)
    except BatchscoreError as exc:
        _fail(exc)
    out.print(f"namespace {namespace}: live version {before} → {info.version} (run {info.run_id})")


@app.command()
def canary(
    namespace: NamespaceArg,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="P%", help="Move the running canary to this share."),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Make the canary live (one atomic step).")
    ] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="End the canary: all keys from the live version.")
    ] = False,
    api: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="The lookup API's base URL: show the canary's share of answers and its "
            "not-found and error rates from its /metrics.",
        ),
    ] = None,
    drift: Annotated[
        bool,
        typer.Option(help="Compare the canary's predictions with the live version's on its keys."),
    ] = False,
    store: StoreOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """A namespace's canary: move its share (--to P%), --promote or --abort it; with none
    of these, show it. Each change is one atomic change of the namespace state."""
    from jobs import canary as canaries

    chosen = [
        name for name, given in (("--to", to), ("--promote", promote), ("--abort", abort)) if given
    ]
    if len(chosen) > 1:
        raise typer.BadParameter(
            f"give one of --to, --promote, --abort, not {' and '.join(chosen)}"
        )
    share = _percent_value(to)
    settings = _run_settings()
    try:
        if share is not None:
            result: Mapping[str, Any] = canaries.set_share(settings, namespace, share, store)
        elif promote:
            result = canaries.promote(settings, namespace, store)
        elif abort:
            result = canaries.abort(settings, namespace, store)
        else:
            result = _canary_report(settings, namespace, store, api, drift)
    except BatchscoreError as exc:
        _fail(exc)
    if output == OutputFormat.json:
        _print_json(result)
        return
    if "note" in result:
        out.print(f"namespace {namespace} in {result['store']}: {result['note']}")
        return
    _print_canary(result)


def _canary_report(
    settings: RunSettings, namespace: str, store: str | None, api: str | None, drift: bool
) -> dict[str, Any]:
    from jobs import canary as canaries
    from jobs.status import canary_status

    report = canary_status(settings, namespace, store, api)
    if drift and report["canary"] is not None:
        report["drift"] = canaries.canary_drift(settings, namespace, store)
    return report


def _print_canary(report: Mapping[str, Any]) -> None:
    running = report["canary"]
    if running is None:
        out.print(f"namespace {report['namespace']}: no canary; live version {report['live']}")
        return
    out.print(
        f"namespace {report['namespace']} in {report['store']}: canary version "
        f"{running['version']} at {running['percent']:g} % of the keys beside live version "
        f"{report['live']} (since {running['started_at']})"
    )
    answers = report.get("answers")
    if answers and answers.get("canary_share") is not None:
        out.print(f"  canary's share of answers: {answers['canary_share']:.1%}")
    for role in ("live", "canary"):
        figures = (answers or {}).get(role)
        if figures and figures["answers"]:
            out.print(
                f"  {role} version {figures['version']}: {figures['answers']:,.0f} answers, "
                f"not found {figures['not_found_rate']:.2%}, errors {figures['error_rate']:.2%}"
            )
    if report.get("answers_error"):
        out.print(f"  answers: {report['answers_error']}")
    if report.get("drift"):
        d = report["drift"]
        out.print(
            f"  drift on {d['keys']:,} canary keys: max |Δ| {d['max_abs_diff']:.4g}, "
            f"mean |Δ| {d['mean_abs_diff']:.4g} ({', '.join(d['outputs'])})"
        )


@app.command()
def status(
    namespace: NamespaceArg,
    store: StoreOpt = None,
    api: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="The lookup API's base URL: during a canary, show its share of answers "
            "(from the API's /metrics).",
        ),
    ] = None,
    output: OutputOpt = OutputFormat.table,
    json_out: JsonFlag = False,
) -> None:
    """Live version, canary, kept versions and the last run's summary of a namespace."""
    from jobs.status import namespace_status

    settings = _run_settings()
    try:
        report = namespace_status(settings, namespace, store, api)
    except BatchscoreError as exc:
        _fail(exc)
    if _as_json(output, json_out):
        _print_json(report)
        return
    title = f"namespace {namespace} in {report['store']}: live version {report['live']}"
    table = Table(title=title)
    for column in ("version", "live", "state", "keys", "model", "run", "published at"):
        table.add_column(column)
    for v in report["versions"]:
        table.add_row(
            str(v["version"]),
            "●" if v["version"] == report["live"] else _canary_mark(report, v["version"]),
            v["state"],
            f"{v['key_count']:,}",
            f"{v['model_name']} v{v['model_version']}",
            v["run_id"],
            v["published_at"] or "",
        )
    out.print(table)
    if report["canary"] is not None:
        _print_canary(report)
    if report["last_run"]:
        print_summary(report["last_run"])


@app.command()
def versions(
    namespace: NamespaceArg,
    store: StoreOpt = None,
    output: OutputOpt = OutputFormat.table,
    json_out: JsonFlag = False,
) -> None:
    """Every version of a namespace in the store: live, kept, loading, expiring, deleting."""
    from jobs.status import namespace_state
    from kv_export.connect import store_target

    settings = _run_settings()
    try:
        label = store_target(settings, store).label
        state = namespace_state(settings, namespace, store)
    except BatchscoreError as exc:
        _fail(exc)
    if _as_json(output, json_out):
        dumped = state.model_dump(mode="json", exclude={"versions": {"__all__": {"parts"}}})
        _print_json({"store": label} | dumped)
        return
    ttl = f"{state.ttl_seconds:,} s" if state.ttl_seconds else "none"
    table = Table(
        title=f"namespace {namespace} in {label}: live {state.live} · kept {state.history} · "
        f"TTL {ttl}"
    )
    for column in ("version", "role", "keys", "model", "run", "completed", "published", "expires"):
        table.add_column(column)
    for number, info in sorted(state.versions.items()):
        table.add_row(
            str(number),
            _role(state, number),
            f"{info.key_count:,}" if info.state == "complete" else f"0 of {info.expected_keys:,}",
            f"{info.model_name} v{info.model_version}",
            info.run_id,
            info.completed_at or "",
            info.published_at or "",
            (info.expires_at or "") + (" (expired)" if info.expired() else ""),
        )
    for number in sorted(state.deleting):
        table.add_row(str(number), "deleting (batchscore gc finishes)", "", "", "", "", "", "")
    out.print(table)


def _canary_mark(report: Mapping[str, Any], version: int) -> str:
    running = report.get("canary")
    return f"canary {running['percent']:g} %" if running and running["version"] == version else ""


def _role(state: Any, number: int) -> str:
    info = state.versions[number]
    if number == state.live:
        return "● live"
    if state.canary is not None and number == state.canary.version:
        return f"canary at {state.canary.percent:g} %"
    if info.state == "loading":
        return "loading"
    if number in state.history:
        return "kept (rollback)"
    return "complete, never published"


def _open_store(settings: RunSettings, store: str | None) -> Any:
    from kv_export.connect import open_from_settings

    return open_from_settings(settings, store)


@app.command()
def gc(
    namespace: NamespaceArg,
    store: StoreOpt = None,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Published versions to keep; default the setting.")
    ] = None,
    ttl: Annotated[
        int | None,
        typer.Option(min=0, help="Record the namespace's TTL in seconds first (0: none)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Show what would be deleted (with --ttl: once the TTL is set); change nothing."
        ),
    ] = False,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Delete versions beyond --keep, stale never-published and expired ones."""
    from kv_export.connect import store_target

    settings = _run_settings()
    kept = keep or settings.keep_versions
    try:
        target = store_target(settings, store)
        opened = target.open()
        try:
            if dry_run:
                state = opened.state(namespace)
                state = state.set_ttl(ttl) if ttl is not None else state
                _, doomed = state.gc(kept, loading_grace_seconds=settings.loading_grace_seconds)
            else:
                if ttl is not None:
                    opened.set_ttl(namespace, ttl)
                doomed = opened.gc(
                    namespace, kept, loading_grace_seconds=settings.loading_grace_seconds
                )
            live = opened.state(namespace).live
        finally:
            opened.close()
    except BatchscoreError as exc:
        _fail(exc)
    if output == OutputFormat.json:
        _print_json(
            {
                "namespace": namespace,
                "store": target.label,
                "dry_run": dry_run,
                "keep": kept,
                "live": live,
                "versions": [_gc_record(info) for info in doomed],
            }
        )
        return
    _print_gc(namespace, target.label, dry_run, doomed, live)


def _gc_record(info: Any) -> dict[str, Any]:
    fields = ("version", "state", "run_id", "model_name", "model_version")
    return {name: getattr(info, name) for name in fields} | {
        "published_at": info.published_at,
        "expires_at": info.expires_at,
    }


def _print_gc(
    namespace: str, label: str, dry_run: bool, doomed: list[Any], live: int | None
) -> None:
    gone = ", ".join(str(info.version) for info in doomed) or "nothing"
    if not dry_run:
        out.print(f"namespace {namespace}: deleted {gone}; live version {live}")
        return
    out.print(f"namespace {namespace} in {label}: gc would delete {gone}; live version {live}")
    if doomed:
        table = Table(title="would delete")
        for column in ("version", "state", "model", "run", "published", "expires"):
            table.add_column(column)
        for info in doomed:
            table.add_row(
                str(info.version),
                info.state,
                f"{info.model_name} v{info.model_version}",
                info.run_id,
                info.published_at or "",
                info.expires_at or "",
            )
        out.print(table)


@model_app.command("register")
def model_register(
    source: Annotated[str, typer.Argument(help="MLflow model folder, or an MLflow model URI.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to point at the new version.")] = None,
) -> None:
    """Register a model and optionally set an alias on the new version."""
    from registry.mlflow_registry import MlflowRegistry

    settings = _run_settings()
    try:
        found = MlflowRegistry.from_settings(settings).register(source, name, alias)
    except BatchscoreError as exc:
        _fail(exc)
    out.print(f"registered {found.name} version {found.version} aliases {list(found.aliases)}")


@model_app.command("promote")
def model_promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="The version the alias points at.")],
    alias: Annotated[str, typer.Option(help="Alias to move, e.g. champion.")] = "champion",
) -> None:
    """Point an alias at a version (runs already started keep their pin)."""
    from registry.mlflow_registry import MlflowRegistry

    settings = _run_settings()
    try:
        found = MlflowRegistry.from_settings(settings).promote(name, version, alias)
    except BatchscoreError as exc:
        _fail(exc)
    out.print(f"{name}@{alias} → version {found.version}")


@model_app.command("list")
def model_list(
    name: Annotated[
        str | None, typer.Argument(help="One registered model; default: every one.")
    ] = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List registered models (every page of them), or the versions and aliases of one."""
    from batchscore.core.urls import public_url
    from registry.errors import ModelNotFound
    from registry.mlflow_registry import MlflowRegistry

    settings = _run_settings()
    try:
        registry = MlflowRegistry.from_settings(settings)
        names = registry.models()
        if name is not None and name not in names:
            raise ModelNotFound(
                f"Registered model '{name}' does not exist in {public_url(settings.tracking_uri)}",
                expected=f"one of {names}" if names else "a registered model",
                fix="Check MLFLOW_TRACKING_URI, or register it: batchscore model register",
            )
        found = {n: registry.versions(n) for n in ([name] if name else names)}
    except BatchscoreError as exc:
        _fail(exc)
    where = public_url(settings.tracking_uri)
    if output == OutputFormat.json:
        models = [
            {"name": n, "versions": [_version_record(v) for v in listed]}
            for n, listed in found.items()
        ]
        _print_json({"registry": where, "models": models})
        return
    table = Table(title=f"models in {where}")
    for column in ("model", "version", "aliases", "source"):
        table.add_column(column)
    for listed in found.values():
        for v in listed:
            table.add_row(v.name, v.version, ", ".join(v.aliases), v.source)
    out.print(table)


def _version_record(version: Any) -> dict[str, Any]:
    return {
        "version": version.version,
        "aliases": list(version.aliases),
        "source": version.source,
        "run_id": version.run_id,
        "created_at": version.created_at,
    }


@step_app.command("resolve")
def step_resolve(
    input: InputOpt = None,
    model: ModelOpt = None,
    key_column: KeyColumnOpt = None,
    namespace: NamespaceOpt = None,
    store: StoreOpt = None,
    output: RunsRootOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    cluster: ClusterOpt = None,
    dashboard: DashboardOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    max_failed_shards: MaxFailedOpt = None,
    features: FeaturesOpt = None,
    shard_rows: ShardRowsOpt = None,
    run_id: RunIdOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    shadow: ShadowOpt = None,
    job_file: JobFileOpt = None,
    date: DateOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Pin the model and create the run folder (the DAG's resolve task); print it as JSON.

    Takes the options of `batchscore run` (or -f and --date); the later steps take the
    printed run_dir.
    """
    request = _run_request(
        job_file=job_file,
        date=date,
        input=input,
        model=model,
        key_column=key_column,
        namespace=namespace,
        store=store,
        features=features,
        shard_rows=shard_rows,
        run_id=run_id,
        dry_run=dry_run,
        force=force,
        shadow=shadow,
        settings={
            "output_dir": output,
            "batch_size": batch_size,
            "cluster": cluster,
            "dashboard": dashboard,
            "device": device.value if device else None,
            "precision": precision.value if precision else None,
            "max_failed_shards": max_failed_shards,
            "workers": workers,
        },
        log_verbose=verbose,
    )
    from jobs.flow import start_run

    try:
        started = start_run(
            request.settings, request.params, run_id=request.run_id, shadow=request.shadow
        )
    except BatchscoreError as exc:
        _fail(exc)
    _print_json(started)


@step_app.command("plan")
def step_plan(run_dir: RunDirArg, verbose: VerboseOpt = False) -> None:
    """Split the input into shards."""
    _one_step("plan", run_dir, verbose)


@step_app.command("score")
def step_score(run_dir: RunDirArg, verbose: VerboseOpt = False) -> None:
    """Score the shards on Dask (those with a part already are kept)."""
    _one_step("score", run_dir, verbose)


@step_app.command("validate")
def step_validate(run_dir: RunDirArg, verbose: VerboseOpt = False) -> None:
    """Check the output, then the drift gate (as the DAG's validate task)."""
    _one_step("validate", run_dir, verbose)


@step_app.command("drift")
def step_drift(run_dir: RunDirArg, verbose: VerboseOpt = False) -> None:
    """The drift gate alone: compare the output with the live version's (exit 4: drifted)."""
    _one_step("drift", run_dir, verbose)


@step_app.command("export")
def step_export(run_dir: RunDirArg, verbose: VerboseOpt = False) -> None:
    """Load the output into the store as a new version, not live yet."""
    _one_step("export", run_dir, verbose)


@step_app.command("publish")
def step_publish(
    run_dir: RunDirArg,
    force: Annotated[
        bool,
        typer.Option(
            help="Publish even if a newer run's version was published (an older run never "
            "replaces newer predictions otherwise)."
        ),
    ] = False,
    canary: CanaryOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Make the exported version live, then collect old versions and run folders; with
    --canary, start it as a canary at that share beside the live version instead."""
    _one_step("publish", run_dir, verbose, force=force or None, canary=_percent_value(canary))


def _one_step(name: str, run_dir: Path, verbose: bool, **options: Any) -> None:
    """One task of the DAG on an existing run folder: the same ``jobs.flow`` call."""
    settings = _run_settings()
    _setup_logging(settings.log_format, verbose)
    from jobs import flow
    from jobs.drift_gate import check_drift

    tasks: dict[str, Callable[..., Mapping[str, object]]] = {
        "plan": flow.plan,
        "score": flow.score,
        "validate": flow.validate_and_gate,  # the drift gate too, as the DAG's task
        "drift": lambda run_dir: check_drift(run_dir, settings),
        "export": flow.export_and_compare,  # a shadow run's comparison too
        "publish": flow.publish_run,
    }
    try:
        result = tasks[name](run_dir, **options)
    except BatchscoreError as exc:
        _fail(exc)
    _print_json(result)


@app.command()
def demo(
    rows: Annotated[int, typer.Option(min=1000, help="Rows in the demo dataset.")] = 1_000_000,
) -> None:
    """Set up a model, data and Airflow, run the DAG, then query the lookup API."""
    from batchscore.demo import run_demo

    settings = _run_settings()
    try:
        code = run_demo(settings, rows=rows, console=out)
    except BatchscoreError as exc:
        _fail(exc)
    raise typer.Exit(code)


if __name__ == "__main__":  # pragma: no cover - python -m batchscore.cli
    app()
