"""The ``batchscore`` command line: the same ``jobs`` functions that the Airflow DAG calls."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
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

from batchscore.core.errors import BatchscoreError
from batchscore.core.settings import ApiSettings, RunSettings, load_settings

app = typer.Typer(
    help="Batch scoring on Airflow, MLflow, Dask and a KV store.", no_args_is_help=True
)
model_app = typer.Typer(
    help="The MLflow model registry: register, promote, list.", no_args_is_help=True
)
step_app = typer.Typer(
    help="Run one pipeline step on an existing run folder.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
app.add_typer(step_app, name="step")
console = Console(stderr=True)
out = Console()

StoreOpt = Annotated[
    str | None, typer.Option("--store", help="lmdb:///path or redis://host:port/db")
]


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


def _setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    for name in ("batchscore", "scoring", "kv_export", "registry", "jobs", "lookup"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("distributed", "great_expectations", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: BatchscoreError) -> None:
    # No wrapping and no markup: the message is one greppable line, brackets included.
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


def _run_settings(**overrides: Any) -> RunSettings:
    try:
        return load_settings(RunSettings, **overrides)
    except BatchscoreError as exc:
        _fail(exc)
        raise


@app.command()
def run(
    input: Annotated[
        str, typer.Option("--input", help="Parquet file or folder (partition folders too).")
    ],
    model: Annotated[str, typer.Option("--model", help="models:/name@alias or models:/name/N")],
    key_column: Annotated[str, typer.Option("--key-column", help="Column with each row's key.")],
    namespace: Annotated[
        str | None,
        typer.Option(help="Keyspace; default: the model's name.", callback=_namespace_value),
    ] = None,
    store: StoreOpt = None,
    output: Annotated[Path | None, typer.Option("--output", help="Root of run folders.")] = None,
    batch_size: Annotated[
        str | None, typer.Option(help="Rows per forward pass, or 'auto' (the largest that fits).")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1)] = None,
    cluster: Annotated[
        str | None, typer.Option(help="local, cuda (dask-cuda), auto, or tcp://scheduler:8786")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (autocast)")] = None,
    max_failed_shards: Annotated[
        int | None, typer.Option(min=0, help="Shards allowed to fail; their rows are left out.")
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="Comma-separated feature columns (tensor-signature models).")
    ] = None,
    shard_rows: Annotated[int | None, typer.Option(min=1, help="Target rows per shard.")] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Run id; default: derived from the inputs.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Score and validate; publish nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Re-score shards whose parts exist, and publish past a failing drift gate "
            "(the override is recorded in the manifest)."
        ),
    ] = False,
    shadow: Annotated[
        str | None,
        typer.Option(
            help="Score this candidate instead (an alias of --model's model, e.g. challenger, "
            "or a model URI): export it unpublished and compare it with the live version."
        ),
    ] = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write the run summary here.")] = None,
    verbose: bool = False,
) -> None:
    """Run the whole pipeline: resolve, plan, score, validate, drift gate, export, publish.

    With --shadow, a shadow run: no drift gate, no publish; the comparison report's path
    is printed last.
    """
    _setup_logging(verbose)
    from jobs.flow import run_flow

    settings = _run_settings(
        output_dir=output,
        batch_size=batch_size,
        cluster=cluster,
        device=device,
        precision=precision,
        max_failed_shards=max_failed_shards,
        workers=workers,
        store_url=store,  # a password in it moves to the settings, never to the manifest
    )
    try:
        from jobs.steps import make_params

        params = make_params(
            settings,
            input_path=input,
            model_uri=model,
            key_column=key_column,
            namespace=namespace,
            shard_rows=shard_rows,
            features=[f.strip() for f in features.split(",") if f.strip()] if features else None,
            dry_run=dry_run,
            force=force,
        )
        with _score_progress() as on_progress:
            manifest = run_flow(
                settings, params, run_id=run_id, shadow=shadow, on_progress=on_progress
            )
    except BatchscoreError as exc:
        _write_summary_of_failure(summary_json, exc)
        _fail(exc)
        return
    summary = manifest.summary()
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    if summary["shadow"]:
        report = summary["reports"].get("shadow_comparison")
        out.print(f"shadow comparison report: file://{report}", soft_wrap=True, highlight=False)
        return
    if not manifest.published and not params.dry_run:
        raise typer.Exit(1)


def _write_summary_of_failure(path: Path | None, exc: BatchscoreError) -> None:
    if path:
        path.write_text(json.dumps({"published": False, "error": exc.to_dict()}, indent=2))


class _score_progress:
    """A live progress bar for the score step: shards done, rows, rows/s."""

    def __enter__(self) -> Any:
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
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
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
        application = create_app(settings)  # fails here, before binding, on a bad setting
    except BatchscoreError as exc:
        _fail(exc)
        return
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
    }
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
        return
    out.print(f"namespace {namespace}: live version {before} → {info.version} (run {info.run_id})")


@app.command()
def status(
    namespace: NamespaceArg, store: StoreOpt = None, json_out: bool = typer.Option(False, "--json")
) -> None:
    """Live version, kept versions and the last run's summary of a namespace."""
    from jobs.status import namespace_status

    settings = _run_settings()
    try:
        report = namespace_status(settings, namespace, store)
    except BatchscoreError as exc:
        _fail(exc)
        return
    if json_out:
        out.print_json(data=report)
        return
    title = f"namespace {namespace} in {report['store']}: live version {report['live']}"
    table = Table(title=title)
    for column in ("version", "live", "state", "keys", "model", "run", "published at"):
        table.add_column(column)
    for v in report["versions"]:
        table.add_row(
            str(v["version"]),
            "●" if v["version"] == report["live"] else "",
            v["state"],
            f"{v['key_count']:,}",
            f"{v['model_name']} v{v['model_version']}",
            v["run_id"],
            v["published_at"] or "",
        )
    out.print(table)
    if report["last_run"]:
        print_summary(report["last_run"])


@app.command()
def versions(
    namespace: NamespaceArg, store: StoreOpt = None, json_out: bool = typer.Option(False, "--json")
) -> None:
    """Every version of a namespace in the store: live, kept, loading, expiring, deleting."""
    from jobs.status import namespace_state

    settings = _run_settings()
    try:
        state = namespace_state(settings, namespace, store)
    except BatchscoreError as exc:
        _fail(exc)
        return
    from kv_export.connect import store_target

    label = store_target(settings, store).label
    if json_out:
        dumped = state.model_dump(mode="json", exclude={"versions": {"__all__": {"parts"}}})
        out.print_json(data={"store": label} | dumped)
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


def _role(state: Any, number: int) -> str:
    info = state.versions[number]
    if number == state.live:
        return "● live"
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
) -> None:
    """Delete versions beyond --keep, stale never-published and expired ones."""
    settings = _run_settings()
    try:
        opened = _open_store(settings, store)
        if ttl is not None:
            opened.set_ttl(namespace, ttl)
        deleted = opened.gc(
            namespace,
            keep or settings.keep_versions,
            loading_grace_seconds=settings.loading_grace_seconds,
        )
        live = opened.state(namespace).live
        opened.close()
    except BatchscoreError as exc:
        _fail(exc)
        return
    gone = ", ".join(str(info.version) for info in deleted) or "nothing"
    out.print(f"namespace {namespace}: deleted {gone}; live version {live}")


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
        found = MlflowRegistry(settings.tracking_uri).register(source, name, alias)
    except BatchscoreError as exc:
        _fail(exc)
        return
    out.print(f"registered {found.name} version {found.version} aliases {list(found.aliases)}")


@model_app.command("promote")
def model_promote(
    name: str,
    version: str,
    alias: Annotated[str, typer.Option(help="Alias to move, e.g. champion.")] = "champion",
) -> None:
    """Point an alias at a version (runs already started keep their pin)."""
    from registry.mlflow_registry import MlflowRegistry

    settings = _run_settings()
    try:
        found = MlflowRegistry(settings.tracking_uri).promote(name, version, alias)
    except BatchscoreError as exc:
        _fail(exc)
        return
    out.print(f"{name}@{alias} → version {found.version}")


@model_app.command("list")
def model_list(name: Annotated[str | None, typer.Argument()] = None) -> None:
    """List registered models, or the versions and aliases of one."""
    from registry.mlflow_registry import MlflowRegistry

    settings = _run_settings()
    registry = MlflowRegistry(settings.tracking_uri)
    table = Table(title=f"models in {settings.tracking_uri}")
    for column in ("model", "version", "aliases", "source"):
        table.add_column(column)
    for model_name in [name] if name else registry.models():
        for v in registry.versions(model_name):
            table.add_row(v.name, v.version, ", ".join(v.aliases), v.source)
    out.print(table)


@step_app.command("plan")
def step_plan(run_dir: Path) -> None:
    _one_step("plan", run_dir)


@step_app.command("score")
def step_score(run_dir: Path) -> None:
    _one_step("score", run_dir)


@step_app.command("validate")
def step_validate(run_dir: Path) -> None:
    _one_step("validate", run_dir)


@step_app.command("export")
def step_export(run_dir: Path) -> None:
    _one_step("export", run_dir)


@step_app.command("publish")
def step_publish(
    run_dir: Path,
    force: Annotated[
        bool,
        typer.Option(
            help="Publish even if a newer run's version was published (an older run never "
            "replaces newer predictions otherwise)."
        ),
    ] = False,
) -> None:
    _one_step("publish", run_dir, force=force or None)


def _one_step(name: str, run_dir: Path, **options: Any) -> None:
    """One task of the DAG on an existing run folder: the same ``jobs.flow`` call."""
    _setup_logging()
    from jobs import flow, steps

    tasks: dict[str, Callable[..., Mapping[str, object]]] = {
        "plan": steps.plan,
        "score": steps.score,
        "validate": flow.validate_and_gate,  # the drift gate too, as the DAG's task
        "export": flow.export_and_compare,  # a shadow run's comparison too
        "publish": flow.publish_run,
    }
    try:
        result = tasks[name](run_dir, **options)
    except BatchscoreError as exc:
        _fail(exc)
        return
    out.print_json(data=result)


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
        return
    raise typer.Exit(code)


if __name__ == "__main__":  # pragma: no cover - python -m batchscore.cli
    app()
