"""Part results as JSON documents: their shape, plain values, and files that exist only whole.

A result document is GX's ``ExpectationValidationResult`` as JSON (``to_json_dict``),
per part as GX wrote it, and across parts as ``scoring.validation.report`` sums them.
The shapes below name the fields this package reads and writes; GX's ``kwargs`` and
``result`` vary with the expectation and stay open mappings.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Required, TypedDict

import numpy as np

#: A value as JSON holds it, e.g. a key or an unexpected value of a column.
JsonScalar = str | int | float | bool | None
#: GX's per-expectation mappings: arguments (column, value, min_value, value_set, …) and
#: result (element, unexpected and missing counts, observed value, samples, …).
GxMapping = dict[str, Any]


class ExpectationConfig(TypedDict, total=False):
    type: Required[str]
    kwargs: Required[GxMapping]
    meta: dict[str, str]  # "scope": "all parts" for the checks made across parts
    id: str  # GX's, new in every run: dropped from stored documents


class ExceptionInfo(TypedDict, total=False):
    raised_exception: bool
    exception_traceback: str | None
    exception_message: str | None


class DocumentMeta(TypedDict, total=False):
    scope: str  # "each part" or "all parts"
    failed_parts: dict[str, str]  # failing part → what it had


class ResultDocument(TypedDict):
    success: bool
    expectation_config: ExpectationConfig
    result: GxMapping
    meta: DocumentMeta
    exception_info: ExceptionInfo


NO_EXCEPTION = ExceptionInfo(
    raised_exception=False, exception_traceback=None, exception_message=None
)


def write_json(path: Path, document: Mapping[str, object]) -> None:
    """Write under a temporary name, then rename: a result that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(json.dumps(document, default=plain))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def plain(value: object) -> JsonScalar:
    """A value JSON can hold: numpy scalars as Python's, bytes decoded, others as text."""
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str | int | bool | type(None)) else str(value)
