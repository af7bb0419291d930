"""Log lines as text or as JSON, one process-wide setup (``BATCHSCORE_LOG_FORMAT``).

In JSON every record is one line holding one object: ``ts`` (UTC, ISO 8601 with
milliseconds), ``level``, ``logger``, ``message`` (the formatted message), ``exc`` (the
traceback's text) when the record carries an exception, and the fields a caller passed
as ``extra={"fields": {...}}``. A log shipper reads each line without a parser of its
own; a message never spans lines, since the newlines in it are escaped by JSON.

Standard library only: this module is imported before anything heavy is.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["text", "json"]

#: The reserved keys of a JSON line; a ``fields`` entry of the same name is dropped.
KEYS = ("ts", "level", "logger", "message", "exc", "stack")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line |= {k: v for k, v in fields.items() if k not in KEYS}
        return json.dumps(line, ensure_ascii=False, default=str)


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing JSON lines to ``stream`` (default: stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure(
    handler: logging.Handler,
    *,
    level: int,
    loggers: Iterable[str],
    quiet: Iterable[str] = (),
) -> None:
    """Make ``handler`` the root's only handler; ``loggers`` log at ``level``, ``quiet``
    ones at WARNING, the rest at WARNING through the root.

    Loggers that carry handlers of their own (a library that configured itself) lose
    them and propagate to the root, so that every line has the same format; Python's
    warnings are logged too (logger ``py.warnings``).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        found = logging.root.manager.loggerDict[name]
        if isinstance(found, logging.Logger) and found.handlers:
            adopt(found)
    logging.captureWarnings(True)


def adopt(logger: logging.Logger) -> None:
    """Drop a library logger's own handlers: its records go to the root's handler."""
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.propagate = True


#: The loggers of batchscore's own packages, at INFO (DEBUG with --verbose).
PROJECT_LOGGERS = ("batchscore", "scoring", "kv_export", "registry", "jobs", "lookup")
#: Libraries whose INFO lines are noise in a run's log: WARNING and above only.
NOISY_LOGGERS = ("distributed", "great_expectations", "mlflow", "alembic")


def dask_setup(worker: object) -> None:
    """Dask preload hook (``--preload batchscore.core.logs``, or the setting
    ``distributed.worker.preload``): the worker process logs JSON lines to its stderr,
    as the process that started it does."""
    configure(json_handler(), level=logging.INFO, loggers=PROJECT_LOGGERS, quiet=NOISY_LOGGERS)
