"""The per-part expectations evaluated with Arrow compute: GX's own result documents.

The per-part suite is a handful of column checks (the row count, the key not null and
unique, each output not null, finite, within its range, within its set of labels) over
a part that is already in memory as Arrow. GX evaluates them through pandas: the part
converted to a DataFrame, a metric graph resolved per expectation, and GX itself
imported first (seconds of CPU in every process that checks a part: docs/benchmarks.md
has the figures). Here each expectation is a few vectorised Arrow kernels, and the
result is the document GX writes for it in the SUMMARY format, field for field:

- missing is what pandas calls missing: null, or NaN in a float column;
- ``expect_column_values_to_not_be_null`` counts missing values as unexpected and has
  no missing fields; the others leave missing values out and report them;
- percentages are GX's arithmetic (``unexpected / count * 100``), ``None`` where the
  count is zero;
- ``partial_unexpected_list`` and ``partial_unexpected_index_list`` are the first 20
  unexpected values (floats as float64, as GX's widened frame holds them) and their row
  positions; ``partial_unexpected_counts`` counts those 20, most common first, then by
  value (a missing number counted once per row: pandas holds it as NaN, and no NaN
  equals another).

``tests/unit/test_part_checks.py`` holds this to GX: the same suite run by GX's pandas
engine (``PartChecks.engine="gx"``) over tables with nulls, NaN, ±inf, values out of
range, repeated keys and labels outside their set must give equal documents.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring.validation.documents import (
    NO_EXCEPTION,
    ExpectationConfig,
    GxMapping,
    JsonScalar,
    ResultDocument,
)

PARTIAL = 20  # GX's SUMMARY keeps this many unexpected values per expectation
NOT_NULL = "expect_column_values_to_not_be_null"
UNIQUE = "expect_column_values_to_be_unique"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
ROW_COUNT = "expect_table_row_count_to_equal"

Column: TypeAlias = pa.ChunkedArray
Unexpected = Callable[[Column, GxMapping], pa.ChunkedArray]  # non-missing values → bool mask


def evaluate(table: pa.Table, configs: Sequence[ExpectationConfig]) -> list[ResultDocument]:
    """The documents GX writes for ``configs`` over ``table``, in the same order."""
    return [_evaluate_one(table, config) for config in configs]


def _evaluate_one(table: pa.Table, config: ExpectationConfig) -> ResultDocument:
    kwargs = config["kwargs"]
    if config["type"] == ROW_COUNT:
        rows = table.num_rows
        return _document(config, rows == kwargs["value"], {"observed_value": rows})
    name = kwargs["column"]
    if name not in table.column_names:
        return _raised(config, f'The column "{name}" in BatchData does not exist.')
    column = table.column(name)
    missing = pc.is_null(column, nan_is_null=True)
    if config["type"] == NOT_NULL:
        return _column_map(config, column, missing, counts_missing=False)
    unexpected = pc.and_not(_UNEXPECTED[config["type"]](column, kwargs), missing)
    return _column_map(config, column, pc.fill_null(unexpected, False), counts_missing=True)


def _column_map(
    config: ExpectationConfig, column: Column, unexpected: pa.ChunkedArray, *, counts_missing: bool
) -> ResultDocument:
    """GX's ``_format_map_output`` for a column check, SUMMARY format."""
    elements = len(column)
    found = int(pc.sum(unexpected).as_py() or 0)
    positions = np.flatnonzero(_mask(unexpected))[:PARTIAL] if found else np.empty(0, np.int64)
    sample = _values(column, positions, missing_values=not counts_missing)
    result: GxMapping = {
        "element_count": elements,
        "unexpected_count": found,
        "unexpected_percent": None,
        "partial_unexpected_list": sample,
    }
    total = found / elements * 100 if elements else None
    if counts_missing:
        nonmissing = elements - column.null_count - _nan_count(column)
        result["unexpected_percent"] = found / nonmissing * 100 if elements and nonmissing else None
        result |= {
            "missing_count": elements - nonmissing,
            "missing_percent": (elements - nonmissing) / elements * 100 if elements else None,
            "unexpected_percent_total": total,
            "unexpected_percent_nonmissing": result["unexpected_percent"],
        }
    else:
        result["unexpected_percent"] = total
    result["partial_unexpected_counts"] = (
        [{"value": None, "count": 1} for _ in sample]  # NaN ≠ NaN: pandas' nulls of a number
        if not counts_missing and _numeric(column)
        else _counts(sample)
    )
    result["partial_unexpected_index_list"] = [int(i) for i in positions]
    return _document(config, found == 0, result)


def _between(column: Column, kwargs: GxMapping) -> pa.ChunkedArray:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    values = _widened(column)
    outside = pa.chunked_array([pa.array(np.zeros(len(column), bool))])
    if low is not None:
        outside = pc.or_(outside, pc.less(values, low))
    if high is not None:
        outside = pc.or_(outside, pc.greater(values, high))
    return outside


def _outside_set(column: Column, kwargs: GxMapping) -> pa.ChunkedArray:
    allowed = list(kwargs["value_set"])
    try:
        value_set = pa.array(allowed).cast(column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # Labels of another kind than the column (text labels, numbers out): pandas'
        # ``isin`` compares them value by value; so does this, rarely.
        members = set(allowed)
        return pa.chunked_array([pa.array([v not in members for v in column.to_pylist()])])
    return pc.invert(pc.is_in(column, value_set=value_set))


def _repeated(column: Column, kwargs: GxMapping) -> pa.ChunkedArray:
    """Every non-missing value that occurs more than once (pandas' ``duplicated(keep=False)``).

    A part is written sorted by key: keys that rise strictly have no repeats, which one
    comparison of neighbours shows; only other columns are counted by hashing."""
    if len(column) < 2 or (column.null_count == 0 and _rising(column)):
        return pa.chunked_array([pa.array(np.zeros(len(column), bool))])
    counts = pc.value_counts(column)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    repeated = pc.drop_null(repeated)
    if len(repeated) == 0:
        return pa.chunked_array([pa.array(np.zeros(len(column), bool))])
    return pc.is_in(column, value_set=repeated)


def _rising(column: Column) -> bool:
    try:
        later = pc.greater(column.slice(1), column.slice(0, len(column) - 1))
    except pa.ArrowNotImplementedError:  # a type without an order
        return False
    return bool(pc.all(later).as_py())


_UNEXPECTED: dict[str, Unexpected] = {BETWEEN: _between, IN_SET: _outside_set, UNIQUE: _repeated}


def _widened(column: Column) -> Column:
    """Floats as float64, as GX's frame holds them (``suite._gx_frame``)."""
    return pc.cast(column, pa.float64()) if pa.types.is_floating(column.type) else column


def _numeric(column: Column) -> bool:
    """A column whose nulls pandas holds as NaN (GX counts each NaN apart, as unequal)."""
    return pa.types.is_floating(column.type) or pa.types.is_integer(column.type)


def _nan_count(column: Column) -> int:
    if not pa.types.is_floating(column.type):
        return 0
    return int(pc.sum(pc.is_nan(column)).as_py() or 0)


def _mask(mask: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _values(column: Column, positions: np.ndarray, *, missing_values: bool) -> list[JsonScalar]:
    """The values at ``positions`` as GX lists them (every missing one as ``None``)."""
    if missing_values:
        return [None] * len(positions)
    taken = _widened(column).take(pa.array(positions, pa.int64()))
    return [_plain(v) for v in taken.to_pylist()]


def _plain(value: Any) -> JsonScalar:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _counts(sample: list[JsonScalar]) -> list[dict[str, JsonScalar | int]]:
    """GX's ``partial_unexpected_counts``: the sample's values, most common first."""
    common = sorted(Counter(sample).most_common(PARTIAL), key=lambda item: (-item[1], item[0]))  # type: ignore[operator]
    return [{"value": value, "count": count} for value, count in common]


def _document(config: ExpectationConfig, success: bool, result: GxMapping) -> ResultDocument:
    return {
        "success": bool(success),
        "expectation_config": _config(config),
        "result": result,
        "meta": {},
        "exception_info": dict(NO_EXCEPTION),  # type: ignore[typeddict-item]
    }


def _raised(config: ExpectationConfig, message: str) -> ResultDocument:
    return {
        "success": False,
        "expectation_config": _config(config),
        "result": {},
        "meta": {},
        "exception_info": {
            "raised_exception": True,
            "exception_traceback": None,
            "exception_message": message,
        },
    }


def _config(config: ExpectationConfig) -> ExpectationConfig:
    """As GX writes an expectation's configuration into its result."""
    return {  # type: ignore[typeddict-unknown-key]
        "type": config["type"],
        "kwargs": dict(config["kwargs"]),
        "meta": {},
        "severity": "critical",
    }


__all__ = ["BETWEEN", "IN_SET", "NOT_NULL", "PARTIAL", "ROW_COUNT", "UNIQUE", "evaluate"]
