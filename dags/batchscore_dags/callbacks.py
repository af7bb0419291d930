"""What Airflow calls when a step fails for good and when a run misses its deadline.

Each says, in one line on the ``batchscore.dag`` logger, which run, which step and why:
the failure in the failed task's log, the deadline in the executor's callback log.
Both are module-level functions so that Airflow can import them by their dotted path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger("batchscore.dag")


def on_task_failure(context: Context) -> None:
    """A task failed and has no retry left (or its retry policy said not to retry)."""
    ti = context["task_instance"]
    log.error(
        "batchscore: step '%s' of DAG %s, run %s, failed on try %s: %s",
        ti.task_id,
        ti.dag_id,
        ti.run_id,
        ti.try_number,
        describe_error(context.get("exception")),
    )


def describe_error(error: object) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error) if error else "no exception was recorded (see the task log)"


def deadline_missed(context: dict[str, Any], job: str) -> None:
    """The run was not finished ``deadline`` after it was queued: say where it is."""
    from batchscore.core.settings import RunSettings, load_settings
    from batchscore_dags.runs import current_step, find_run_dir, run_key

    run = context.get("dag_run") or {}
    deadline = (context.get("deadline") or {}).get("deadline_time")
    dag_id, dag_run_id = run.get("dag_id", job), run.get("dag_run_id", "?")
    key = run_key(dag_id, dag_run_id, run.get("logical_date"), None)
    run_dir = find_run_dir(load_settings(RunSettings).runs_location, key)
    step, done = current_step(run_dir)
    log.warning(
        "batchscore: run %s of DAG %s is late: its deadline %s passed while it is in step "
        "'%s' (steps done: %s; run folder: %s)",
        dag_run_id,
        dag_id,
        deadline,
        step,
        ", ".join(done) or "none",
        run_dir or "not created yet",
    )
