"""Tell people when a step fails for good, and when a quality gate blocks a run.

A job config's ``notify`` picks the events (``failure``, ``gate``) and the channel: mail
through Airflow's SMTP provider (``SmtpNotifier``, which comes with Airflow) and one of
Airflow's SMTP connections. A blocked gate is a task that failed with ``ValidationFailed``
or ``DriftDetected`` (the validate step's verdict; the retry policy fails it at once): its
mail says which gate blocked the run, so that it reads as a verdict on the data and not as
an outage. Every other final failure is a ``failure``.

The message says which DAG, task, run and try, and the error's type and message. It is
sent as it is composed: the notifier renders no template, since the error text may carry
what the person who triggered the run wrote (an input path), and Jinja in it must not run.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from airflow.sdk import BaseNotifier

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger("batchscore.dag")

Event = Literal["failure", "gate"]
EVENTS: tuple[Event, ...] = ("failure", "gate")
#: The quality gates' verdicts, by dotted class name (a subclass counts too), with the
#: gate they come from; matched without importing them, so that sending stays light.
GATE_ERRORS = {
    "scoring.errors.ValidationFailed": "validation",
    "scoring.errors.DriftDetected": "drift",
}


def blocked_gate(error: object) -> str | None:
    """``"validation"`` or ``"drift"`` when ``error`` is a gate's verdict, else None."""
    for cls in type(error).__mro__:
        if gate := GATE_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}"):
            return gate
    return None


@dataclass(frozen=True)
class Message:
    event: Event
    subject: str
    html: str


def compose(context: Context) -> Message:
    """The mail for a task that failed for good: a blocked gate, or a failure."""
    ti = context["task_instance"]
    error = context.get("exception")
    gate = blocked_gate(error)
    where = f"DAG {ti.dag_id}, run {ti.run_id}"
    if gate:
        event: Event = "gate"
        subject = f"[batchscore] {gate} gate blocked {where}: nothing was published"
    else:
        event = "failure"
        subject = f"[batchscore] step '{ti.task_id}' failed: {where}"
    from batchscore_dags.callbacks import describe_error

    rows = {
        "DAG": ti.dag_id,
        "Task": ti.task_id,
        "Run": ti.run_id,
        "Logical date": str(context.get("logical_date") or "none"),
        "Try": str(ti.try_number),
        "Error": describe_error(error),
        "Log": getattr(ti, "log_url", "") or "",
    }
    cells = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td><pre>{html.escape(v)}</pre></td></tr>"
        for k, v in rows.items()
    )
    lead = (
        f"The {gate} gate blocked this run: its output was not published."
        if gate
        else f"Step '{ti.task_id}' failed and will not be retried."
    )
    return Message(event, subject, f"<p>{html.escape(lead)}</p><table>{cells}</table>")


class JobNotifier(BaseNotifier):
    """An ``on_failure_callback``: mails the job's recipients about the events they chose."""

    template_fields: Sequence[str] = ()

    def __init__(
        self,
        *,
        events: Sequence[Event],
        to: Sequence[str],
        from_email: str | None,
        conn_id: str,
    ) -> None:
        super().__init__()
        self.events = tuple(events)
        self.to = list(to)
        self.from_email = from_email
        self.conn_id = conn_id

    def notify(self, context: Context) -> None:
        message = compose(context)
        if message.event not in self.events:
            return
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        # notify(), not __call__: __call__ would render the subject and body as templates.
        SmtpNotifier(
            to=self.to,
            from_email=self.from_email,
            smtp_conn_id=self.conn_id,
            subject=message.subject,
            html_content=message.html,
        ).notify(context)
        log.info("batchscore: sent '%s' to %s", message.subject, ", ".join(self.to))
