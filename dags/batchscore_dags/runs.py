"""How a DAG run maps onto a batchscore run: its id, its input path, the step it is in.

The batchscore run id (the run folder, the store version's ``run_id``) is derived from
the DAG and the run's logical date, so one logical date is one run however often it is
retried, cleared, backfilled again or re-run with ``airflow dags test``: a re-run finds
the run folder, keeps its model pin, scores nothing twice and publishes nothing twice.
A run without a logical date (asset-triggered, or triggered with ``logical_date: null``)
is identified by its DAG run id, which retries and clears keep. A shadow run of a
candidate is a run of its own beside the regular run of the same date.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The DAG's tasks in order, each named after the manifest step it records.
STEPS = ("resolve", "plan", "score", "validate", "export", "publish")


def run_key(
    dag_id: str, dag_run_id: str, logical_date: datetime | str | None, candidate: str | None
) -> str:
    """``<dag_id>__<logical date>`` (or ``__<dag run id>``), ``__shadow_<candidate>`` for shadows.

    Not yet folder-safe: ``jobs.manifest.safe_run_id`` makes it so.
    """
    if isinstance(logical_date, str):
        logical_date = datetime.fromisoformat(logical_date)
    base = f"{dag_id}__{logical_date.isoformat() if logical_date else dag_run_id}"
    return f"{base}__shadow_{candidate}" if candidate else base


#: What an input path template may use: the run's dates and ids, nothing else. Not
#: ``conn``, ``var``, ``macros``, ``params``, ``dag_run`` or ``task``: anyone allowed to
#: trigger a run writes the template, and could otherwise read secrets back from the
#: log, an error message or manifest.json.
TEMPLATE_NAMES = (
    "ds",
    "ds_nodash",
    "ts",
    "ts_nodash",
    "logical_date",
    "data_interval_start",
    "data_interval_end",
    "run_id",
    "dag_id",
    "dag.dag_id",
)
TEMPLATE_ALLOWED = (
    f"{{{{ ... }}}} expressions of {', '.join(TEMPLATE_NAMES)} only, with the filters "
    "ds, ds_nodash, ts, ts_nodash, lower, upper, replace, default and date methods "
    "such as logical_date.strftime('%Y/%m/%d')"
)
FIELD = "input_path"


def data_as_of(logical_date: datetime | str | None) -> str | None:
    """What a DAG run's data is as of: its logical date, the order its version goes live in
    (a backfill or a late retry of an older date never replaces a newer date's version).
    None without a logical date: the run's creation time orders it instead."""
    if logical_date is None:
        return None
    if isinstance(logical_date, str):
        logical_date = datetime.fromisoformat(logical_date)
    return logical_date.isoformat()


def render_input_path(template: str, context: Context, home: Path) -> str:
    """Render the input path with the run's dates only; relative paths are under home.

    The template is rendered in a Jinja sandbox that knows the names of
    ``TEMPLATE_NAMES`` and nothing else: no Airflow context object is reachable from
    it, so the secrets of connections and variables are not either. A template that
    needs the logical date fails here, with the reason, on a run that has none.
    """
    from jinja2 import TemplateError, UndefinedError

    try:
        compiled = _sandbox().from_string(_checked(template))
        rendered = compiled.render(_template_names(context)).strip()
    except UndefinedError as exc:
        run_id = context["dag_run"].run_id
        if not _unset_name(str(exc)):
            raise _refused(template, f"an unknown attribute ({exc})") from None
        raise _error(
            f"The {FIELD} template {template!r} cannot be rendered for run {run_id}: {exc}",
            expected="a logical date for templates such as {{ ds }}",
            fix="Trigger the run with a logical date, or give input_path without a date "
            "template (an asset-triggered run has no logical date)",
        ) from None
    except TemplateError as exc:
        raise _refused(template, f"something unsafe ({exc})") from None
    if "://" in rendered:  # an object-store URL (s3://bucket/dt=.../): taken as it is
        return rendered
    path = Path(rendered).expanduser()
    return str(path if path.is_absolute() else home / path)


def _checked(template: str) -> str:
    """Refuse, before rendering, names outside the allowed set and statements."""
    from jinja2 import TemplateSyntaxError, meta, nodes

    environment = _sandbox()
    try:
        parsed = environment.parse(template)
    except TemplateSyntaxError:
        raise _refused(template, "a template syntax error") from None
    allowed = {name.split(".")[0] for name in TEMPLATE_NAMES}
    unknown = sorted(meta.find_undeclared_variables(parsed) - allowed)
    if unknown:
        raise _refused(template, f"the name(s) {', '.join(unknown)}")
    statements = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Assign)
    if any(True for _ in parsed.find_all(statements)):
        raise _refused(template, "a {% ... %} statement")
    return template


def _sandbox() -> Any:
    """A sandbox with no globals, a few filters and no ``*``/``**`` (huge strings)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment, SecurityError

    class Sandbox(SandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            raise SecurityError(f"the operator {operator} is not allowed")

    environment = Sandbox(undefined=StrictUndefined, autoescape=False)
    environment.globals.clear()
    keep = {"lower", "upper", "replace", "default", "d", "string", "trim"}
    environment.filters = {k: v for k, v in environment.filters.items() if k in keep}
    environment.filters |= {
        "ds": lambda d: d.strftime("%Y-%m-%d"),
        "ds_nodash": lambda d: d.strftime("%Y%m%d"),
        "ts": lambda d: d.isoformat(),
        "ts_nodash": lambda d: d.strftime("%Y%m%dT%H%M%S"),
    }
    return environment


def _template_names(context: Context) -> dict[str, object]:
    """The allowed names as plain values (a ``dag`` that has a ``dag_id`` and nothing
    else); a name the run lacks (no logical date) is left out, so it is undefined."""
    from types import SimpleNamespace

    dag_id = context["dag"].dag_id
    names = {name: context.get(name) for name in TEMPLATE_NAMES if "." not in name}
    names |= {"dag_id": dag_id, "dag": SimpleNamespace(dag_id=dag_id)}
    names["run_id"] = names["run_id"] or context["dag_run"].run_id
    return {name: value for name, value in names.items() if value is not None}


def _unset_name(message: str) -> bool:
    """An allowed name that this run has no value for (a run without a logical date)."""
    return any(message == f"'{name}' is undefined" for name in TEMPLATE_NAMES)


def _refused(template: str, what: str) -> Exception:
    return _error(
        f"The {FIELD} template {template!r} uses {what}, which an input path may not use",
        expected=TEMPLATE_ALLOWED,
        fix=f"Give {FIELD} as a path with date macros only, e.g. /data/churn/dt={{{{ ds }}}}",
    )


def _error(what: str, *, expected: str, fix: str) -> Exception:
    from jobs.errors import RunError

    return RunError(what, expected=expected, fix=fix)


def find_run_dir(runs_dir: str | Path, key: str) -> str | None:
    """The run folder of a run key in any namespace, as a path or, under an object-store
    root (``RunSettings.runs_location``, ``s3://bucket/runs``), a URL; None when no run of
    the key has a manifest yet.

    The folder named for the key itself comes first; else the key's shadow run
    (``<key>__shadow_<candidate>``, what a DAG run with a shadow candidate scores). Another
    key that merely starts with this one (``manual__1`` and ``manual__10``) is another run.
    Where several namespaces hold one, the manifest written last wins.
    """
    from batchscore.core import storage
    from jobs.manifest import MANIFEST, safe_run_id

    exact = safe_run_id(key)
    shadow = safe_run_id(f"{key}__shadow_x")[:-1]  # as its folder begins, whatever the key

    def rank(name: str) -> int | None:  # 1: the key's own run, 0: its shadow run
        return 1 if name == exact else 0 if name.startswith(shadow) else None

    written: list[tuple[int, int, str]] = []
    if not storage.is_remote(runs_dir):
        for manifest in Path(runs_dir).glob(f"*/{exact}*/{MANIFEST}"):
            found = rank(manifest.parent.name)
            if found is not None:
                written.append((found, manifest.stat().st_mtime_ns, str(manifest.parent)))
        return max(written)[2] if written else None
    for namespace in storage.folders(runs_dir):  # delimited listings: no part is listed
        for folder in storage.folders(namespace):
            found = rank(storage.name_of(folder))
            if found is None:
                continue
            try:
                modified = storage.stat(storage.join(folder, MANIFEST)).st_mtime_ns
            except FileNotFoundError:  # not a run (yet, or any more)
                continue
            written.append((found, modified, folder))
    return max(written)[2] if written else None


def current_step(run_dir: str | Path | None) -> tuple[str, list[str]]:
    """The first task whose step the manifest has not recorded, and the steps it has
    (the manifest read where the run folder is: on disk or on an object store)."""
    if run_dir is None:
        return STEPS[0], []
    from jobs.manifest import load_manifest

    done = [step for step in STEPS if step in load_manifest(run_dir).steps]
    waiting = [step for step in STEPS if step not in done]
    return (waiting[0] if waiting else "finished"), done
