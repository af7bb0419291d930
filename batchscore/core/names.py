"""The one rule for user-given names that become folders, store keys and URL paths.

A namespace is a folder under ``BATCHSCORE_HOME/runs/``, part of every store key and
a path segment of the lookup API, so it is checked once, at each edge where a user
gives one (CLI, trigger form, job config, pipeline, stores, API), against this rule:

    1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or a digit,
    without '..'

so it is never ``.``/``..``, never absolute, never hidden and never an option
(``-x``). Every name this rule accepts, the lookup API accepted before it
(``[A-Za-z0-9._-]{1,128}``).

Imported by the DAG files: the standard library only, besides the error root.
"""

from __future__ import annotations

import re

from batchscore.core.errors import InvalidName

#: JSON Schema / pydantic / ``re`` pattern (anchored; the look-ahead works in each).
NAMESPACE_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
NAMESPACE_RULE = (
    "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or a digit, without '..'"
)


def is_namespace(value: object) -> bool:
    return isinstance(value, str) and NAMESPACE_RE.fullmatch(value) is not None


def check_namespace(value: object, field: str = "namespace", fix: str | None = None) -> str:
    """``value`` when it is a valid namespace; else ``InvalidName`` naming ``field``."""
    if is_namespace(value):
        assert isinstance(value, str)
        return value
    raise InvalidName(
        f"The {field} {_shown(value)} is not a valid namespace",
        expected=NAMESPACE_RULE,
        fix=fix,
    )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}…' ({len(str(value))} characters)"
