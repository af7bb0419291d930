"""Validate a run's output with Great Expectations before anything is exported.

The suite: the output has exactly one row per input row, the key is never null
and unique across all parts, and every output is present and finite. The parts
are read once into one frame, so the global properties (row count, uniqueness)
are checked across parts, not per shard (one GX run over one frame: per-part
validation on the workers is not built yet, see docs/quality.md).

Per output, ``scoring.quality.OutputRules`` add a range (probabilities: [0, 1]
by default) and a known set of class labels. With ``docs_dir`` the run's Data
Docs (HTML, ``index.html``) are built there by a checkpoint action.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from scoring.quality import OutputRules

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
    docs_index: str | None = None

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def validate_output(
    parts: Sequence[Path],
    key_column: str,
    outputs: Sequence[str],
    expected_rows: int,
    *,
    rules: Mapping[str, OutputRules] | None = None,
    docs_dir: Path | None = None,
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
    if docs_dir is not None:
        _add_docs_site(context, docs_dir)
    batch = (
        context.data_sources.add_pandas("batchscore")
        .add_dataframe_asset("output")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="batchscore-output"))
    for expectation in _expectations(gx, key_column, outputs, expected_rows, rules or {}):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="batchscore-output", data=batch, suite=suite)
    )
    actions: list[Any] = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[DOCS_SITE])]
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="batchscore-output",
            validation_definitions=[definition],
            actions=actions if docs_dir is not None else [],
            result_format="SUMMARY",
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    result = next(iter(run.run_results.values()))
    outcomes = [_outcome(r) for r in result.results]
    index = docs_dir / "index.html" if docs_dir is not None else None
    return ValidationReport(
        success=bool(result.success),
        rows=len(frame),
        seconds=time.perf_counter() - started,
        outcomes=outcomes,
        docs_index=str(index) if index is not None and index.exists() else None,
    )


DOCS_SITE = "run"


def _add_docs_site(context: Any, docs_dir: Path) -> None:
    """A Data Docs site whose files land in ``docs_dir`` (the run folder's ``data_docs``)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(
        site_name=DOCS_SITE,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )


def _expectations(
    gx: Any, key: str, outputs: Sequence[str], rows: int, rules: Mapping[str, OutputRules]
) -> list[Any]:
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
        rule = rules.get(name, OutputRules())
        if rule.min_value is not None or rule.max_value is not None:
            found.append(
                expect.ExpectColumnValuesToBeBetween(
                    column=name, min_value=rule.min_value, max_value=rule.max_value
                )
            )
        if rule.values is not None:
            found.append(expect.ExpectColumnValuesToBeInSet(column=name, value_set=rule.values))
    return found


def _outcome(result: Any) -> Outcome:
    config = result.expectation_config
    details = result.result or {}
    name = config.type
    if name == "expect_column_values_to_be_between" and config.kwargs.get("max_value") == (
        FINITE_BOUND
    ):
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
