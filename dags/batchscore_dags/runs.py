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
from typing import Any

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


def data_as_of(logical_date: datetime | str | None) -> str | None:
    """What a DAG run's data is as of: its logical date, the order its version goes live in
    (a backfill or a late retry of an older date never replaces a newer date's version).
    None without a logical date: the run's creation time orders it instead."""
    if logical_date is None:
        return None
    if isinstance(logical_date, str):
        logical_date = datetime.fromisoformat(logical_date)
    return logical_date.isoformat()


def render_input_path(template: str, context: Any, home: Path) -> str:
    """Render the input path with the run's template context; relative paths are under home.

    The DAG's Jinja environment is strict, so a template that needs the logical date fails
    here, with the reason, on a run that has none.
    """
    from jinja2 import UndefinedError

    from jobs.errors import RunError

    try:
        rendered = str(context["task"].render_template(template, context)).strip()
    except UndefinedError as exc:
        raise RunError(
            f"The input path template {template!r} cannot be rendered for run "
            f"{context['dag_run'].run_id}: {exc}",
            expected="a logical date for templates such as {{ ds }}",
            fix="Trigger the run with a logical date, or give input_path without a date "
            "template (an asset-triggered run has no logical date)",
        ) from None
    path = Path(rendered).expanduser()
    return str(path if path.is_absolute() else home / path)


def find_run_dir(runs_dir: Path, key: str) -> Path | None:
    """The run folder of a run key in any namespace (the most recently written one)."""
    from jobs.manifest import MANIFEST, safe_run_id

    found = list(runs_dir.glob(f"*/{safe_run_id(key)}*/{MANIFEST}"))
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def current_step(run_dir: Path | None) -> tuple[str, list[str]]:
    """The first task whose step the manifest has not recorded, and the steps it has."""
    if run_dir is None:
        return STEPS[0], []
    from jobs.manifest import load_manifest

    done = [step for step in STEPS if step in load_manifest(run_dir).steps]
    waiting = [step for step in STEPS if step not in done]
    return (waiting[0] if waiting else "finished"), done
