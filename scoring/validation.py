"""Validate a run's output with Great Expectations before anything is exported.

The suite: the output has exactly one row per input row, the key is never null
and unique across all parts, and every output is present and finite. The parts
are read once into one frame, so the global properties (row count, uniqueness)
are checked across parts, not per shard.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

FINITE_BOUND = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class Outcome:
    expectation: str
    column: str | None
    success: bool
    observed: Any = None
    unexpected_count: int | None = None
    sample: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        detail = (
            f"{self.unexpected_count} unexpected values, e.g. {self.sample[:5]}"
            if self.unexpected_count
            else f"observed {self.observed}"
        )
        return f"{self.expectation}{where} ({detail})"


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    seconds: float
    outcomes: list[Outcome]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def validate_output(
    parts: Sequence[Path], key_column: str, outputs: Sequence[str], expected_rows: int
) -> ValidationReport:
    started = time.perf_counter()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = (
        pq.ParquetDataset([str(p) for p in parts]).read(columns=[key_column, *outputs]).to_pandas()
    )
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("batchscore")
        .add_dataframe_asset("output")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="batchscore-output"))
    for expectation in _expectations(gx, key_column, outputs, expected_rows):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="batchscore-output", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
    outcomes = [_outcome(r) for r in result.results]
    return ValidationReport(
        success=bool(result.success),
        rows=len(frame),
        seconds=time.perf_counter() - started,
        outcomes=outcomes,
    )


def _expectations(gx: Any, key: str, outputs: Sequence[str], rows: int) -> list[Any]:
    expect = gx.expectations
    found = [
        expect.ExpectTableRowCountToEqual(value=rows),
        expect.ExpectColumnValuesToNotBeNull(column=key),
        expect.ExpectColumnValuesToBeUnique(column=key),
    ]
    for name in outputs:
        found.append(expect.ExpectColumnValuesToNotBeNull(column=name))
        found.append(
            expect.ExpectColumnValuesToBeBetween(
                column=name, min_value=-FINITE_BOUND, max_value=FINITE_BOUND
            )
        )
    return found


def _outcome(result: Any) -> Outcome:
    config = result.expectation_config
    details = result.result or {}
    name = config.type
    if name == "expect_column_values_to_be_between":
        name = "expect_column_values_to_be_finite (between ±float max)"
    return Outcome(
        expectation=name,
        column=config.kwargs.get("column"),
        success=bool(result.success),
        observed=details.get("observed_value"),
        unexpected_count=details.get("unexpected_count"),
        sample=[_plain(v) for v in details.get("partial_unexpected_list", [])[:10]],
    )


def _plain(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
