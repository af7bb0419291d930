"""Validate a run's output with Great Expectations: per part on the workers, globally once.

Two kinds of expectations (docs/quality.md):

- **per part**, a GX suite run on the Dask worker that scored the part, at the end of
  the shard's task while the part is still in memory (``check_part``): the part has
  its shard's rows, the key is not null and unique within the part, every output is
  not null and finite, plus per output a range (probabilities: [0, 1] by default) and
  a known set of class labels. The result lands next to the run's parts
  (``<run>/validation/part-NNNNN.json``); one that is missing or stale (another
  suite, a re-written part) is checked again by the validate step, on a cluster
  (``check_parts_on``);
- **across parts**, once in the validate step (``validate_parts``): the total row
  count equals the input's (less rows of tolerated failed shards), and the key is
  unique across all parts. Parts are sorted by key: two parts whose key ranges do
  not overlap cannot share a key, and parts whose ranges overlap are merged in key
  order a row group at a time (``duplicate_keys``), so memory is bounded by parts ×
  row-group size, not by rows.

The per-part results are summed into one suite result (unexpected counts added, the
failing parts named) which, with the global checks, is the run's verdict and the page
of its Data Docs; each failing part gets its own page too. GX is imported on first use,
once per process, never when this module is imported.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scoring.quality import OutputRules, default_output_rules

SUITE = "batchscore-output"
SUITE_VERSION = 2  # bump when the per-part suite changes: older part results are re-checked
FINITE_BOUND = float(np.finfo(np.float64).max)
FINITE_NAME = "expect_column_values_to_be_finite (between ±float max)"
ROW_COUNT = "expect_table_row_count_to_equal"
UNIQUE = "expect_column_values_to_be_unique"
PARTIAL = 20  # GX's SUMMARY keeps this many unexpected values per expectation
SUMMARY_ONLY = ("partial_unexpected_counts", "partial_unexpected_index_list")  # not in BASIC
NAMED_PARTS = 5  # parts named in a message; the manifest keeps them all
DOCS_PART_PAGES = 20  # failing parts with a Data Docs page of their own
NO_EXCEPTION = {"raised_exception": False, "exception_traceback": None, "exception_message": None}


@dataclass(frozen=True)
class PartChecks:
    """The per-part suite: shipped to the workers with the score job, pure data."""

    key_column: str
    rules: Mapping[str, OutputRules]  # configured and signature outputs; others: defaults
    results_dir: str

    def rules_for(self, outputs: Sequence[str]) -> dict[str, OutputRules]:
        defaults = default_output_rules(outputs)
        return {name: self.rules.get(name, defaults[name]) for name in outputs}

    @property
    def fingerprint(self) -> str:
        """Identifies the suite: a part result made under another one is stale."""
        rules = {name: asdict(rule) for name, rule in sorted(self.rules.items())}
        text = json.dumps([SUITE_VERSION, self.key_column, rules], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def result_path(self, part: str | Path) -> Path:
        return Path(self.results_dir) / f"{Path(part).stem}.json"


@dataclass(frozen=True)
class PartTarget:
    """One part to validate: its shard and the rows the shard planned."""

    shard_id: int
    part: str
    expected_rows: int


@dataclass(frozen=True)
class PartReport:
    """The per-part suite's result for one part, as stored next to the run's parts."""

    shard_id: int
    part: str
    expected_rows: int
    rows: int
    success: bool
    seconds: float
    min_key: int | str | None
    max_key: int | str | None
    fingerprint: str
    part_size: int
    part_mtime_ns: int
    checked_by: str  # host:pid of the process that ran GX
    results: list[dict[str, Any]]  # GX ExpectationValidationResult documents (SUMMARY)

    @property
    def name(self) -> str:
        return Path(self.part).name


@dataclass(frozen=True)
class Outcome:
    expectation: str
    column: str | None
    success: bool
    observed: Any = None
    unexpected_count: int | None = None
    sample: list[Any] = field(default_factory=list)
    expected: Any = None
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# --- per part: on the workers ---------------------------------------------------------


def check_part(table: pa.Table, target: PartTarget, checks: PartChecks) -> PartReport:
    """Run the per-part suite over a part's table (sorted by key) and store the result.

    Runs where the part was made (the end of its shard's scoring task) or, for a part
    without a fresh result, on a worker of the validate step's cluster.
    """
    started = time.perf_counter()
    key = checks.key_column
    outputs = [n for n in table.column_names if n != key]
    suite = _part_suite(checks, tuple(outputs))
    result = suite.run(_gx_frame(table, key, outputs), target.expected_rows)
    keys = table.column(key)
    stat = Path(target.part).stat()
    report = PartReport(
        shard_id=target.shard_id,
        part=str(target.part),
        expected_rows=target.expected_rows,
        rows=table.num_rows,
        success=bool(result["success"]),
        seconds=time.perf_counter() - started,
        min_key=keys[0].as_py() if len(keys) else None,
        max_key=keys[-1].as_py() if len(keys) else None,
        fingerprint=checks.fingerprint,
        part_size=stat.st_size,
        part_mtime_ns=stat.st_mtime_ns,
        checked_by=f"{socket.gethostname()}:{os.getpid()}",
        results=result["results"],
    )
    _write_json(checks.result_path(target.part), asdict(report))
    return report


def check_part_file(target: PartTarget, checks: PartChecks) -> PartReport:
    """Read a part (key and outputs) and check it: the validate step's re-check."""
    return check_part(pq.read_table(target.part), target, checks)


def check_parts_on(
    client: Any, targets: Sequence[PartTarget], checks: PartChecks
) -> list[PartReport]:
    """Check parts on a Dask cluster, one task per part (GX imported once per worker)."""
    tag = uuid.uuid4().hex[:8]
    futures = client.map(
        check_part_file,
        list(targets),
        checks=checks,
        key=[f"validate-{tag}-{t.shard_id}" for t in targets],
        pure=False,
    )
    return list(client.gather(futures))


def fresh_report(target: PartTarget, checks: PartChecks) -> PartReport | None:
    """The stored result of ``target``, if it was made by this suite for this very file."""
    try:
        report = PartReport(**json.loads(checks.result_path(target.part).read_text()))
        stat = Path(target.part).stat()
    except (OSError, ValueError, TypeError):  # none, unreadable, or of another layout
        return None
    same = (
        report.fingerprint == checks.fingerprint
        and report.shard_id == target.shard_id
        and report.expected_rows == target.expected_rows
        and (report.part_size, report.part_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    )
    return report if same else None


class _PartSuite:
    """One GX context, suite and validation definition, built once per process and suite."""

    def __init__(self, checks: PartChecks, outputs: tuple[str, ...]) -> None:
        gx = import_gx()
        self.context = _context(gx)
        batch = (
            self.context.data_sources.add_pandas("batchscore")
            .add_dataframe_asset("part")
            .add_batch_definition_whole_dataframe("part")
        )
        suite = self.context.suites.add(gx.ExpectationSuite(name=SUITE))
        for expectation in _expectations(gx, checks.key_column, checks.rules_for(outputs)):
            suite.add_expectation(expectation)
        self.definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=SUITE, data=batch, suite=suite)
        )
        self.lock = threading.Lock()  # a worker may run several tasks in threads

    def run(self, frame: Any, expected_rows: int) -> dict[str, Any]:
        """SUMMARY documents of the suite over ``frame``, at BASIC's price when it passes.

        BASIC skips SUMMARY's value counts of the unexpected values (a third of GX's time
        on a passing part, measured). A part that passes has no unexpected values, so its
        SUMMARY lists are empty and are filled in as such; a part that fails (rare) runs
        again as SUMMARY, whose counts its report shows.
        """
        with self.lock:
            result = self._run(frame, expected_rows, "BASIC")
            if not result.success:
                result = self._run(frame, expected_rows, "SUMMARY")
                return {"success": False, "results": [_document(r) for r in result.results]}
        documents = [_document(r) for r in result.results]
        for document in documents:
            if "unexpected_count" in document["result"]:
                document["result"] |= {name: [] for name in SUMMARY_ONLY}
        return {"success": True, "results": documents}

    def _run(self, frame: Any, expected_rows: int, result_format: str) -> Any:
        return self.definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters={"expected_rows": expected_rows},
            result_format=result_format,
        )


_suites: dict[tuple[str, tuple[str, ...]], _PartSuite] = {}
_suites_lock = threading.Lock()
KEPT_SUITES = 32  # per process: a long-lived worker serves many namespaces' suites


def _part_suite(checks: PartChecks, outputs: tuple[str, ...]) -> _PartSuite:
    """The process's suite for these checks and outputs, built on first use; the least
    recently used beyond ``KEPT_SUITES`` are dropped."""
    with _suites_lock:
        key = (checks.fingerprint, outputs)
        suite = _suites.pop(key, None) or _PartSuite(checks, outputs)
        _suites[key] = suite  # now the most recently used
        while len(_suites) > KEPT_SUITES:
            del _suites[next(iter(_suites))]
        return suite


def _expectations(gx: Any, key: str, rules: Mapping[str, OutputRules]) -> list[Any]:
    expect = gx.expectations
    found = [
        expect.ExpectTableRowCountToEqual(value={"$PARAMETER": "expected_rows"}),
        expect.ExpectColumnValuesToNotBeNull(column=key),
        expect.ExpectColumnValuesToBeUnique(column=key),
    ]
    for name, rule in rules.items():
        found.append(expect.ExpectColumnValuesToNotBeNull(column=name))
        found.append(
            expect.ExpectColumnValuesToBeBetween(
                column=name, min_value=-FINITE_BOUND, max_value=FINITE_BOUND
            )
        )
        if rule.min_value is not None or rule.max_value is not None:
            found.append(
                expect.ExpectColumnValuesToBeBetween(
                    column=name, min_value=rule.min_value, max_value=rule.max_value
                )
            )
        if rule.values is not None:
            found.append(expect.ExpectColumnValuesToBeInSet(column=name, value_set=rule.values))
    return found


def _gx_frame(table: pa.Table, key: str, outputs: Sequence[str]) -> Any:
    """Outputs as float64: GX's pandas range check is vectorised only for int64/float64.

    (float32 takes a Python call per value, ~10× slower; widening is exact.)
    """
    columns = {key: table.column(key)}
    for name in outputs:
        column = table.column(name)
        columns[name] = (
            pc.cast(column, pa.float64()) if pa.types.is_floating(column.type) else column
        )
    return pa.table(columns).to_pandas()


def _document(result: Any) -> dict[str, Any]:
    """A GX result as a plain JSON document, without the per-run noise."""
    document = result.to_json_dict()
    document["expectation_config"]["kwargs"].pop("batch_id", None)
    document["expectation_config"].pop("id", None)
    return json.loads(json.dumps(document, default=_plain))


# --- across parts: once, in the validate step -----------------------------------------


@dataclass(frozen=True)
class KeyDuplicates:
    rows: int  # rows whose key occurs more than once, over all parts
    sample: list[Any]
    parts: dict[str, int]  # part name → its rows with a duplicated key
    parts_merged: int  # parts whose keys were read (their key range overlaps another's)


def duplicate_keys(reports: Sequence[PartReport], key: str, limit: int = PARTIAL) -> KeyDuplicates:
    """Keys occurring more than once across all parts, in memory bounded by row groups.

    A part whose key range overlaps no other part's can only repeat its own keys, which
    its per-part uniqueness result counts. Parts with overlapping ranges are merged.
    """
    rows, merged = 0, 0
    sample: list[Any] = []
    parts: dict[str, int] = {}
    for group in overlapping_groups(reports):
        if len(group) == 1:
            found = _own_duplicates(group[0], key)
        else:
            found = _merge_duplicates([Path(r.part) for r in group], key, limit)
            merged += len(group)
        rows += found.rows
        sample += found.sample[: max(limit - len(sample), 0)]
        parts |= found.parts
    return KeyDuplicates(rows, sample, parts, merged)


def overlapping_groups(reports: Sequence[PartReport]) -> list[list[PartReport]]:
    """Parts grouped so that key ranges of different groups are disjoint (empty parts: none)."""
    ranged = sorted((r for r in reports if r.rows and r.min_key is not None), key=_min_key)
    groups: list[list[PartReport]] = []
    high: Any = None
    for report in ranged:
        if groups and report.min_key <= high:  # type: ignore[operator]
            groups[-1].append(report)
            high = max(high, report.max_key)
        else:
            groups.append([report])
            high = report.max_key
    return groups


def _min_key(report: PartReport) -> Any:
    return report.min_key


def _own_duplicates(report: PartReport, key: str) -> KeyDuplicates:
    for document in report.results:
        config = document["expectation_config"]
        if config["type"] == UNIQUE and config["kwargs"].get("column") == key:
            result = document.get("result") or {}
            count = int(result.get("unexpected_count") or 0)
            sample = sorted(set(result.get("partial_unexpected_list") or []))
            return KeyDuplicates(count, sample, {report.name: count} if count else {}, 0)
    return _merge_duplicates([Path(report.part)], key, PARTIAL)


class _KeyCursor:
    """The sorted keys of one part, read a row group at a time."""

    def __init__(self, path: Path, key: str) -> None:
        self.file = pq.ParquetFile(path)
        self.name = path.name
        self.key = key
        self.next_group = 0
        self.buffer: np.ndarray = np.empty(0)

    @property
    def exhausted(self) -> bool:
        return self.next_group >= self.file.num_row_groups

    def load(self) -> None:
        column = self.file.read_row_group(self.next_group, columns=[self.key]).column(0)
        self.next_group += 1
        keys = pc.drop_null(column).to_numpy()
        self.buffer = np.concatenate([self.buffer, keys]) if len(self.buffer) else keys

    def take(self, count: int) -> np.ndarray:
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken


def _merge_duplicates(paths: Sequence[Path], key: str, limit: int) -> KeyDuplicates:
    """k-way merge of sorted parts in windows: every key value falls into exactly one window.

    A window takes, from every part, the keys below the smallest last-loaded key of the
    parts not yet read to the end; nothing below it is left unread, so equal keys are
    never split between windows.
    """
    cursors = [_KeyCursor(p, key) for p in paths]
    rows = 0
    sample: list[Any] = []
    parts: Counter[str] = Counter()
    while True:
        for cursor in cursors:
            while not len(cursor.buffer) and not cursor.exhausted:
                cursor.load()
        live = [c for c in cursors if len(c.buffer)]
        if not live:
            break
        unread = [c for c in live if not c.exhausted]
        if unread:
            bound = min(c.buffer[-1] for c in unread)
            cuts = [int(np.searchsorted(c.buffer, bound, "left")) for c in live]
            if not any(cuts):  # every buffer starts at the bound: read further where it ends
                for cursor in unread:
                    if cursor.buffer[-1] == bound:
                        cursor.load()
                continue
        else:
            cuts = [len(c.buffer) for c in live]
        window = [c.take(n) for c, n in zip(live, cuts, strict=True)]
        found = _window_duplicates(window, [c.name for c in live])
        rows += found.rows
        sample += found.sample[: max(limit - len(sample), 0)]
        parts.update(found.parts)
    return KeyDuplicates(rows, sample, dict(parts), len(paths))


def _window_duplicates(window: list[np.ndarray], names: list[str]) -> KeyDuplicates:
    keys = np.sort(np.concatenate(window), kind="stable")  # sorted runs: merged, not sorted
    if not (keys[1:] == keys[:-1]).any():
        return KeyDuplicates(0, [], {}, 0)
    keys = np.concatenate(window)  # rare: find which parts hold the repeated keys
    owners = np.repeat(np.arange(len(window)), [len(w) for w in window])
    order = np.argsort(keys, kind="stable")
    keys, owners = keys[order], owners[order]
    same = keys[1:] == keys[:-1]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    counts = np.bincount(owners[repeated], minlength=len(names))
    parts = {names[i]: int(n) for i, n in enumerate(counts) if n}
    sample = [_plain(v) for v in np.unique(keys[repeated])[:PARTIAL]]
    return KeyDuplicates(int(repeated.sum()), sample, parts, 0)


# --- one verdict for the run ------------------------------------------------------------


DocsBuilder = Callable[
    [Path, str, list[dict[str, Any]], bool, Sequence[PartReport], Sequence[PartReport]],
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
) -> list[dict[str, Any]]:
    """One suite result from the parts': per-part expectations summed, global ones added.

    Each document's ``meta.failed_parts`` names the parts that failed it.
    """
    rows = sum(r.rows for r in reports)
    short = {r.name: f"{r.rows} rows, its shard has {r.expected_rows}" for r in reports}
    merged = [
        _global(
            {"type": ROW_COUNT, "kwargs": {"value": expected_rows}},
            rows == expected_rows and all(r.rows == r.expected_rows for r in reports),
            {"observed_value": rows},
            {n: s for n, s in short.items() if n in _row_count_failures(reports)},
        ),
        _global(
            {"type": UNIQUE, "kwargs": {"column": key}},
            duplicates.rows == 0,
            _counts(rows, duplicates.rows, 0, duplicates.sample),
            {n: f"{c} rows with a repeated key" for n, c in duplicates.parts.items()},
        ),
    ]
    per_part: dict[str, list[tuple[str, dict[str, Any]]]] = {}
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
    config: dict[str, Any], success: bool, result: dict[str, Any], failed: dict[str, str]
) -> dict[str, Any]:
    return {
        "success": success,
        "expectation_config": config | {"meta": {"scope": "all parts"}},
        "result": result,
        "meta": {"scope": "all parts", "failed_parts": failed},
        "exception_info": NO_EXCEPTION,
    }


def _sum_documents(found: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Unexpected, missing and element counts added; samples and value counts pooled."""
    first = found[0][1]
    results = [d.get("result") or {} for _, d in found]

    def total(name: str) -> int:
        return sum(int(r.get(name) or 0) for r in results)

    missing = total("missing_count") if any("missing_count" in r for r in results) else None
    sample = [v for r in results for v in r.get("partial_unexpected_list") or []][:PARTIAL]
    result = _counts(total("element_count"), total("unexpected_count"), missing, sample)
    pooled: Counter[str] = Counter()
    values: dict[str, Any] = {}
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


def _counts(elements: int, unexpected: int, missing: int | None, sample: list[Any]) -> dict:
    present = elements - (missing or 0)
    result: dict[str, Any] = {
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


def _outcome(document: dict[str, Any]) -> Outcome:
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


def _exception(document: dict[str, Any]) -> str | None:
    info = document.get("exception_info") or {}
    if not info.get("raised_exception"):
        return None
    return str(info.get("exception_message") or "an exception")[:300]


# --- Data Docs ------------------------------------------------------------------------

DOCS_SITE = "run"


def build_data_docs(
    docs_dir: Path,
    run_name: str,
    merged: list[dict[str, Any]],
    success: bool,
    reports: Sequence[PartReport],
    failing: Sequence[PartReport],
) -> Path | None:
    """The run's Data Docs in ``docs_dir``: the summed result, and a page per failing part
    (the first ``DOCS_PART_PAGES``)."""
    gx = import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = _context(gx)
    _add_docs_site(context, docs_dir)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    shown = failing[:DOCS_PART_PAGES]
    failed = ", ".join(r.name for r in shown) or "none"
    if len(failing) > len(shown):
        failed += f" and {len(failing) - len(shown)} more (all in the run's manifest)"
    pages = [("all-parts", merged, success, f"{len(reports)} output parts; failed: {failed}")]
    pages += [(r.name, r.results, r.success, r.part) for r in shown]
    schema = ExpectationSuiteValidationResultSchema()
    for batch, results, passed, what in pages:
        document = _suite_document(results, passed, run_name, what)
        identifier = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=SUITE),
            run_id=run_id,
            batch_identifier=batch,
        )
        context.validation_results_store.set(identifier, schema.load(document))
    context.build_data_docs(site_names=[DOCS_SITE])
    index = docs_dir / "index.html"
    return index if index.exists() else None


def _suite_document(
    results: list[dict[str, Any]], success: bool, run_name: str, what: str
) -> dict[str, Any]:
    passed = sum(1 for r in results if r.get("success"))
    return {
        "success": success,
        "results": results,
        "suite_name": SUITE,
        "statistics": {
            "evaluated_expectations": len(results),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(results) - passed,
            "success_percent": 100 * passed / len(results) if results else None,
        },
        "meta": {
            "great_expectations_version": _gx_version(),
            "run_id": {"run_name": run_name, "run_time": datetime.now(UTC).isoformat()},
            "batch_spec": {"batch_data": what},
        },
    }


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


# --- helpers --------------------------------------------------------------------------


def import_gx() -> Any:
    """GX costs 2-3 s to import: once per process, on first use, with the cyclic garbage
    collector paused meanwhile. The import leaves next to no garbage, but the full
    collections its allocations trigger each walk every object loaded so far: ~0.5 s of
    the import (measured in the validate step's process)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    collecting = gc.isenabled()
    gc.disable()
    try:
        import great_expectations as gx
    finally:
        if collecting:
            gc.enable()
    return gx


def _gx_version() -> str:
    import great_expectations as gx

    return str(gx.__version__)


def _context(gx: Any) -> Any:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Write under a temporary name, then rename: a result that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(json.dumps(document, default=_plain))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if not isinstance(value, str | int | bool | type(None)) else value
