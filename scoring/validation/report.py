"""The run's verdict: per-part results summed into one suite result, with the global checks.

``validate_parts`` gathers a fresh per-part result for every part (re-checking the
missing and stale ones), adds the checks that need every part (the total row count,
the key unique across parts) and sums the per-part documents: unexpected counts added,
the failing parts named. That sum is the run's verdict and the page of its Data Docs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scoring.validation.arrow_checks import PARTIAL, ROW_COUNT, UNIQUE
from scoring.validation.docs import build_data_docs
from scoring.validation.documents import (
    NO_EXCEPTION,
    ExpectationConfig,
    GxMapping,
    JsonScalar,
    ResultDocument,
)
from scoring.validation.keys import KeyDuplicates, duplicate_keys
from scoring.validation.suite import (
    FINITE_BOUND,
    FINITE_NAME,
    PartChecks,
    PartReport,
    PartTarget,
    fresh_report,
)

NAMED_PARTS = 5  # parts named in a message; the manifest keeps them all


@dataclass(frozen=True)
class Outcome:
    expectation: str
    column: str | None
    success: bool
    observed: object = None  # GX's observed value, e.g. the row count
    unexpected_count: int | None = None
    sample: list[JsonScalar] = field(default_factory=list)  # unexpected values
    expected: object = None
    scope: str = "each part"  # or "all parts": computed once across the parts
    parts: dict[str, str] = field(default_factory=dict)  # failing part → what it had
    error: str | None = None  # GX raised instead of evaluating the expectation

    def describe(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        scope = " across all parts" if self.scope == "all parts" else ""
        if self.error:
            detail = f"GX raised: {self.error}"
        elif self.unexpected_count:
            detail = f"{self.unexpected_count} unexpected values, e.g. {self.sample[:5]}"
        elif self.expected is not None:
            detail = f"observed {self.observed}, expected {self.expected}"
        else:
            detail = f"observed {self.observed}"
        named = [f"{part} ({what})" for part, what in list(self.parts.items())[:NAMED_PARTS]]
        more = len(self.parts) - len(named)
        in_parts = f" in {', '.join(named)}" + (f" and {more} more parts" if more > 0 else "")
        return f"{self.expectation}{where}{scope} ({detail}){in_parts if named else ''}"


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    seconds: float
    outcomes: list[Outcome]
    docs_index: str | None = None
    parts: int = 0
    failed_parts: list[str] = field(default_factory=list)
    parts_reused: int = 0  # fresh stored results: the workers' while scoring, or earlier ones
    parts_rechecked: int = 0  # checked by the validate step (missing or stale results)
    part_check_seconds: float = 0.0  # GX time summed over parts, on the workers
    global_seconds: float = 0.0
    docs_seconds: float = 0.0

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict[str, object]:
        return json.loads(json.dumps(asdict(self), default=str))


DocsBuilder = Callable[
    [Path, str, list[ResultDocument], bool, Sequence[PartReport], Sequence[PartReport]],
    Path | None,
]


def validate_parts(
    targets: Sequence[PartTarget],
    checks: PartChecks,
    expected_rows: int,
    *,
    recheck: Callable[[list[PartTarget]], Sequence[PartReport]],
    docs_dir: Path | None = None,
    run_name: str = "run",
    build_docs: DocsBuilder | None = None,
) -> ValidationReport:
    """The run's verdict: fresh per-part results (``recheck`` makes the missing ones),
    the global row count and key uniqueness, summed into one suite result; its Data Docs
    in ``docs_dir``, by ``build_docs`` (``build_data_docs`` in this process by default)."""
    started = time.perf_counter()
    found = {t.shard_id: fresh_report(t, checks) for t in targets}
    stale = [t for t in targets if found[t.shard_id] is None]
    rechecked = list(recheck(stale)) if stale else []
    reports = sorted(
        [r for r in found.values() if r is not None] + rechecked, key=lambda r: r.shard_id
    )
    global_started = time.perf_counter()
    duplicates = duplicate_keys(reports, checks.key_column)
    merged = merge_results(reports, checks.key_column, expected_rows, duplicates)
    global_seconds = time.perf_counter() - global_started
    outcomes = [_outcome(d) for d in merged]
    success = all(o.success for o in outcomes)
    failed_parts = sorted({p for o in outcomes for p in o.parts})
    docs_started = time.perf_counter()
    index = None
    if docs_dir is not None:
        failing = [r for r in reports if r.name in failed_parts]
        index = (build_docs or build_data_docs)(
            docs_dir, run_name, merged, success, reports, failing
        )
    return ValidationReport(
        success=success,
        rows=sum(r.rows for r in reports),
        seconds=time.perf_counter() - started,
        outcomes=outcomes,
        docs_index=str(index) if index is not None else None,
        parts=len(reports),
        failed_parts=failed_parts,
        parts_reused=len(reports) - len(rechecked),
        parts_rechecked=len(rechecked),
        part_check_seconds=sum(r.seconds for r in reports),
        global_seconds=global_seconds,
        docs_seconds=time.perf_counter() - docs_started,
    )


def merge_results(
    reports: Sequence[PartReport], key: str, expected_rows: int, duplicates: KeyDuplicates
) -> list[ResultDocument]:
    """One suite result from the parts': per-part expectations summed, global ones added.

    Each document's ``meta.failed_parts`` names the parts that failed it.
    """
    rows = sum(r.rows for r in reports)
    short = {r.name: f"{r.rows} rows, its shard has {r.expected_rows}" for r in reports}
    merged = [
        _global(
            ExpectationConfig(type=ROW_COUNT, kwargs={"value": expected_rows}),
            rows == expected_rows and all(r.rows == r.expected_rows for r in reports),
            {"observed_value": rows},
            {n: s for n, s in short.items() if n in _row_count_failures(reports)},
        ),
        _global(
            ExpectationConfig(type=UNIQUE, kwargs={"column": key}),
            duplicates.rows == 0,
            _counts(rows, duplicates.rows, 0, duplicates.sample),
            {n: f"{c} rows with a repeated key" for n, c in duplicates.parts.items()},
        ),
    ]
    per_part: dict[str, list[tuple[str, ResultDocument]]] = {}
    for report in reports:
        for document in report.results:
            config = document["expectation_config"]
            if config["type"] == ROW_COUNT or (
                config["type"] == UNIQUE and config["kwargs"].get("column") == key
            ):
                continue  # decided across parts above
            identity = json.dumps([config["type"], config["kwargs"]], sort_keys=True)
            per_part.setdefault(identity, []).append((report.name, document))
    merged += [_sum_documents(found) for found in per_part.values()]
    return merged


def _row_count_failures(reports: Iterable[PartReport]) -> set[str]:
    return {r.name for r in reports if r.rows != r.expected_rows}


def _global(
    config: ExpectationConfig, success: bool, result: GxMapping, failed: dict[str, str]
) -> ResultDocument:
    return {
        "success": success,
        "expectation_config": ExpectationConfig(
            type=config["type"], kwargs=config["kwargs"], meta={"scope": "all parts"}
        ),
        "result": result,
        "meta": {"scope": "all parts", "failed_parts": failed},
        "exception_info": NO_EXCEPTION,
    }


def _sum_documents(found: list[tuple[str, ResultDocument]]) -> ResultDocument:
    """Unexpected, missing and element counts added; samples and value counts pooled."""
    first = found[0][1]
    results = [d.get("result") or {} for _, d in found]

    def total(name: str) -> int:
        return sum(int(r.get(name) or 0) for r in results)

    missing = total("missing_count") if any("missing_count" in r for r in results) else None
    sample = [v for r in results for v in r.get("partial_unexpected_list") or []][:PARTIAL]
    result = _counts(total("element_count"), total("unexpected_count"), missing, sample)
    pooled: Counter[str] = Counter()
    values: dict[str, object] = {}
    for r in results:
        for item in r.get("partial_unexpected_counts") or []:
            token = json.dumps(item["value"])
            pooled[token] += int(item["count"])
            values[token] = item["value"]
    result["partial_unexpected_counts"] = [
        {"value": values[t], "count": c} for t, c in pooled.most_common(PARTIAL)
    ]
    failed = {
        name: "GX raised"
        if _exception(d)
        else f"{(d.get('result') or {}).get('unexpected_count', 0)} unexpected"
        for name, d in found
        if not d.get("success")
    }
    raised = [d for _, d in found if (d.get("exception_info") or {}).get("raised_exception")]
    return {
        "success": all(d.get("success") for _, d in found),
        "expectation_config": first["expectation_config"],
        "result": result,
        "meta": {"scope": "each part", "failed_parts": failed},
        "exception_info": raised[0]["exception_info"] if raised else first["exception_info"],
    }


def _counts(
    elements: int, unexpected: int, missing: int | None, sample: list[JsonScalar]
) -> GxMapping:
    present = elements - (missing or 0)
    result: GxMapping = {
        "element_count": elements,
        "unexpected_count": unexpected,
        "unexpected_percent": 100 * unexpected / present if present else None,
        "partial_unexpected_list": sample,
        "partial_unexpected_index_list": [],  # row positions within a part mean nothing here
    }
    if missing is not None:
        result |= {
            "missing_count": missing,
            "missing_percent": 100 * missing / elements if elements else None,
            "unexpected_percent_total": 100 * unexpected / elements if elements else None,
            "unexpected_percent_nonmissing": result["unexpected_percent"],
        }
    return result


def _outcome(document: ResultDocument) -> Outcome:
    config = document["expectation_config"]
    kwargs = config.get("kwargs") or {}
    result = document.get("result") or {}
    meta = document.get("meta") or {}
    name = config["type"]
    if name == "expect_column_values_to_be_between" and kwargs.get("max_value") == FINITE_BOUND:
        name = FINITE_NAME
    return Outcome(
        expectation=name,
        column=kwargs.get("column"),
        success=bool(document.get("success")),
        observed=result.get("observed_value"),
        unexpected_count=result.get("unexpected_count"),
        sample=list(result.get("partial_unexpected_list") or [])[:10],
        expected=kwargs.get("value") if name == ROW_COUNT else None,
        scope=meta.get("scope", "each part"),
        parts=dict(meta.get("failed_parts") or {}),
        error=_exception(document),
    )


def _exception(document: ResultDocument) -> str | None:
    info = document.get("exception_info") or {}
    if not info.get("raised_exception"):
        return None
    return str(info.get("exception_message") or "an exception")[:300]
