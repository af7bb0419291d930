"""The per-part GX suite: run on the Dask worker that scored a part, while it is in memory.

``check_part`` runs the suite over one part (its shard's rows, the key not null and
unique within the part, every output not null and finite, plus per output a range and
a known set of class labels) and stores the result next to the run's parts
(``<run>/validation/part-NNNNN.json``). A stored result is fresh (``fresh_report``)
only for this suite and this very file; a missing or stale one is checked again by
the validate step, on a cluster (``check_parts_on``). The suite is built once per
process and suite; GX is imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.core import storage
from scoring.quality import OutputRules, default_output_rules
from scoring.validation import arrow_checks
from scoring.validation.arrow_checks import BETWEEN, IN_SET, NOT_NULL, ROW_COUNT, UNIQUE
from scoring.validation.documents import ExpectationConfig, ResultDocument, plain, write_json
from scoring.validation.gx import ephemeral_context, import_gx

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client
    from great_expectations.core import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.expectations import Expectation

SUITE = "batchscore-output"
SUITE_VERSION = 2  # bump when the per-part suite changes: older part results are re-checked
FINITE_BOUND = float(np.finfo(np.float64).max)
FINITE_NAME = "expect_column_values_to_be_finite (between ±float max)"
Key = int | str  # a part's key column: integers or strings
SUMMARY_ONLY = ("partial_unexpected_counts", "partial_unexpected_index_list")  # not in BASIC


@dataclass(frozen=True)
class PartChecks:
    """The per-part suite: shipped to the workers with the score job, pure data."""

    key_column: str
    rules: Mapping[str, OutputRules]  # configured and signature outputs; others: defaults
    results_dir: str
    # Who evaluates the suite: Arrow compute (``arrow_checks``), or GX's pandas engine.
    # Both write the same documents, so a result stays fresh when this changes.
    engine: Literal["arrow", "gx"] = "arrow"

    def rules_for(self, outputs: Sequence[str]) -> dict[str, OutputRules]:
        defaults = default_output_rules(outputs)
        return {name: self.rules.get(name, defaults[name]) for name in outputs}

    @property
    def fingerprint(self) -> str:
        """Identifies the suite: a part result made under another one is stale."""
        rules = {name: asdict(rule) for name, rule in sorted(self.rules.items())}
        text = json.dumps([SUITE_VERSION, self.key_column, rules], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def result_path(self, part: str | Path) -> str:
        """Where a part's result is kept: beside the run's parts, so on the object store
        when the run folder is there, where every host that checks or validates finds it."""
        return storage.join(self.results_dir, f"{storage.name_of(part).rsplit('.', 1)[0]}.json")


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
    min_key: Key | None
    max_key: Key | None
    fingerprint: str
    part_size: int
    part_mtime_ns: int
    checked_by: str  # host:pid of the process that checked the part
    results: list[ResultDocument]  # GX's documents, SUMMARY format (whichever engine)

    @property
    def name(self) -> str:
        return Path(self.part).name


def check_part(table: pa.Table, target: PartTarget, checks: PartChecks) -> PartReport:
    """Run the per-part suite over a part's table (sorted by key) and store the result.

    Runs where the part was made (the end of its shard's scoring task) or, for a part
    without a fresh result, on a worker of the validate step's cluster.
    """
    started = time.perf_counter()
    key = checks.key_column
    outputs = [n for n in table.column_names if n != key]
    if checks.engine == "gx":
        suite = _part_suite(checks, tuple(outputs))
        result = suite.run(_gx_frame(table, key, outputs), target.expected_rows)
    else:
        configs = expectation_configs(key, checks.rules_for(outputs), target.expected_rows)
        documents = arrow_checks.evaluate(table, configs)
        result = SuiteResult(success=all(d["success"] for d in documents), results=documents)
    keys = table.column(key)
    stat = storage.stat(target.part)
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
    path = checks.result_path(target.part)
    if storage.is_remote(path):  # one object, whole or absent, as a local rename is
        storage.put_bytes(path, json.dumps(asdict(report), default=plain).encode())
    else:
        write_json(Path(path), asdict(report))
    return report


def check_part_file(target: PartTarget, checks: PartChecks) -> PartReport:
    """Read a part (key and outputs) and check it: the validate step's re-check."""
    return check_part(storage.open_parquet(target.part).read(), target, checks)


def check_parts_on(
    client: Client, targets: Sequence[PartTarget], checks: PartChecks
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
        report = PartReport(**json.loads(storage.read_bytes(checks.result_path(target.part))))
        stat = storage.stat(target.part)
    except (OSError, ValueError, TypeError):  # none, unreadable, or of another layout
        return None
    same = (
        report.fingerprint == checks.fingerprint
        and report.shard_id == target.shard_id
        and report.expected_rows == target.expected_rows
        and (report.part_size, report.part_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    )
    return report if same else None


class SuiteResult(TypedDict):
    success: bool
    results: list[ResultDocument]


class _PartSuite:
    """One GX context, suite and validation definition, built once per process and suite."""

    def __init__(self, checks: PartChecks, outputs: tuple[str, ...]) -> None:
        gx = import_gx()
        self.context = ephemeral_context(gx)
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

    def run(self, frame: pd.DataFrame, expected_rows: int) -> SuiteResult:
        """SUMMARY documents of the suite over ``frame``, at BASIC's price when it passes.

        BASIC skips SUMMARY's extra queries per expectation (the unexpected values, their
        counts and positions), which SUMMARY runs on every part, a passing one included,
        where they find nothing. A part that passes has no unexpected values, so its
        SUMMARY lists are empty and are filled in as such; a part that fails (rare) runs
        again as SUMMARY, whose counts its report shows.
        """
        with self.lock:
            result = self._run(frame, expected_rows, "BASIC")
            if not result.success:
                result = self._run(frame, expected_rows, "SUMMARY")
                return SuiteResult(success=False, results=[_document(r) for r in result.results])
        documents = [_document(r) for r in result.results]
        for document in documents:
            if "unexpected_count" in document["result"]:
                document["result"] |= {name: [] for name in SUMMARY_ONLY}
        return SuiteResult(success=True, results=documents)

    def _run(
        self, frame: pd.DataFrame, expected_rows: int, result_format: Literal["BASIC", "SUMMARY"]
    ) -> ExpectationSuiteValidationResult:
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


def expectation_configs(
    key: str, rules: Mapping[str, OutputRules], expected_rows: int | dict[str, str]
) -> list[ExpectationConfig]:
    """The per-part suite as GX expectation configurations, in the order of its results."""
    configs = [
        _config(ROW_COUNT, value=expected_rows),
        _config(NOT_NULL, column=key),
        _config(UNIQUE, column=key),
    ]
    for name, rule in rules.items():
        configs.append(_config(NOT_NULL, column=name))
        configs.append(
            _config(BETWEEN, column=name, min_value=-FINITE_BOUND, max_value=FINITE_BOUND)
        )
        if rule.min_value is not None or rule.max_value is not None:
            configs.append(
                _config(BETWEEN, column=name, min_value=rule.min_value, max_value=rule.max_value)
            )
        if rule.values is not None:
            configs.append(_config(IN_SET, column=name, value_set=list(rule.values)))
    return configs


def _config(kind: str, **kwargs: object) -> ExpectationConfig:
    """An argument that is None is left out, as GX leaves it out of its documents."""
    return ExpectationConfig(type=kind, kwargs={k: v for k, v in kwargs.items() if v is not None})


def _expectations(gx: ModuleType, key: str, rules: Mapping[str, OutputRules]) -> list[Expectation]:
    """The suite as GX expectations; the row count is a parameter of each run."""
    classes = {
        ROW_COUNT: gx.expectations.ExpectTableRowCountToEqual,
        NOT_NULL: gx.expectations.ExpectColumnValuesToNotBeNull,
        UNIQUE: gx.expectations.ExpectColumnValuesToBeUnique,
        BETWEEN: gx.expectations.ExpectColumnValuesToBeBetween,
        IN_SET: gx.expectations.ExpectColumnValuesToBeInSet,
    }
    configs = expectation_configs(key, rules, {"$PARAMETER": "expected_rows"})
    return [classes[c["type"]](**c["kwargs"]) for c in configs]


def _gx_frame(table: pa.Table, key: str, outputs: Sequence[str]) -> pd.DataFrame:
    """Outputs as float64: GX's pandas range check is vectorised only for int64/float64.

    (float32 takes a Python call per value; widening is exact.)
    """
    columns = {key: table.column(key)}
    for name in outputs:
        column = table.column(name)
        columns[name] = (
            pc.cast(column, pa.float64()) if pa.types.is_floating(column.type) else column
        )
    return pa.table(columns).to_pandas()


def _document(result: ExpectationValidationResult) -> ResultDocument:
    """A GX result as a plain JSON document, without the per-run noise."""
    document: ResultDocument = json.loads(json.dumps(result.to_json_dict(), default=plain))
    document["expectation_config"]["kwargs"].pop("batch_id", None)
    document["expectation_config"].pop("id", None)
    return document
