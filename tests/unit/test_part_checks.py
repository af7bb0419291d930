"""The per-part suite evaluated with Arrow compute gives GX's own documents.

GX's pandas engine is the oracle: every table below is checked by both engines
(``PartChecks.engine``) and the stored documents must be equal, field for field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring.quality import OutputRules
from scoring.validation import PartChecks, PartTarget, check_part

RNG = np.random.default_rng(7)
KEY = "k"
RULES = {
    "p": OutputRules(min_value=0.0, max_value=1.0),
    "label": OutputRules(values=(0.0, 1.0, 2.0)),
    "score": OutputRules(max_value=10.0),
}


def both_engines(table: pa.Table, tmp_path: Path, expected_rows: int | None = None) -> list:
    """The stored part result of each engine, less what differs by nature (time, who)."""
    part = tmp_path / "part-00000.parquet"
    pq.write_table(table, part)
    target = PartTarget(0, str(part), table.num_rows if expected_rows is None else expected_rows)
    found = []
    for engine in ("arrow", "gx"):
        checks = PartChecks(KEY, RULES, str(tmp_path / engine), engine=engine)
        report = check_part(table, target, checks)
        stored = json.loads(Path(checks.result_path(part)).read_text())
        assert stored["success"] == report.success
        for field in ("seconds", "checked_by"):
            stored.pop(field)
        found.append(stored)
    return found


def table_of(rows: int, **columns: np.ndarray | pa.Array) -> pa.Table:
    data = {
        KEY: np.arange(rows, dtype=np.int64),
        "p": RNG.uniform(0, 1, rows).astype(np.float32),
        "label": RNG.integers(0, 3, rows).astype(np.float64),
        "score": RNG.normal(0, 1, rows).astype(np.float32),
    }
    return pa.table(data | columns)


CASES = {
    "passes": lambda: table_of(5_000),
    "empty": lambda: table_of(0),
    "nan, inf, out of range": lambda: table_of(
        300,
        p=pa.array(
            np.where(np.arange(300) % 7 == 0, np.nan, np.where(np.arange(300) % 11 == 0, 1.5, 0.5)),
            pa.float32(),
        ),
        score=np.select(
            [np.arange(300) % 13 == 0, np.arange(300) % 17 == 0], [np.inf, -np.inf], 0.5
        ).astype(np.float32),
    ),
    "nulls": lambda: table_of(
        50,
        p=pa.array([None if i % 3 == 0 else 0.25 for i in range(50)], pa.float32()),
        label=pa.array([None if i % 5 == 0 else 7.0 for i in range(50)], pa.float64()),
    ),
    "repeated keys": lambda: table_of(400, **{KEY: np.repeat(np.arange(200, dtype=np.int64), 2)}),
    "repeated and null keys": lambda: table_of(
        30, **{KEY: pa.array([None if i < 3 else i // 2 for i in range(30)], pa.int64())}
    ),
    "labels outside their set": lambda: table_of(
        100, label=np.where(np.arange(100) % 4 == 0, 3.0, 1.0)
    ),
    "all missing": lambda: table_of(10, p=pa.array([np.nan] * 10, pa.float32())),
    "string keys, repeated": lambda: table_of(
        60, **{KEY: pa.array([f"user-{i % 45:03d}" for i in range(60)])}
    ),
    "string keys, null": lambda: table_of(
        40, **{KEY: pa.array([None if i % 3 == 0 else f"u{i}" for i in range(40)])}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_arrow_documents_equal_gx_documents(case: str, tmp_path: Path) -> None:
    arrow, gx = both_engines(CASES[case](), tmp_path)
    assert arrow["results"] == gx["results"]
    assert arrow == gx


def test_a_row_count_off_the_plan_fails_in_both(tmp_path: Path) -> None:
    arrow, gx = both_engines(table_of(100), tmp_path, expected_rows=101)
    assert arrow == gx and arrow["success"] is False
    assert arrow["results"][0]["result"] == {"observed_value": 100}


def test_a_missing_output_column_is_an_exception_document_not_a_crash(tmp_path: Path) -> None:
    from scoring.validation.arrow_checks import evaluate
    from scoring.validation.suite import expectation_configs

    configs = expectation_configs(KEY, {"gone": OutputRules()}, 3)
    documents = evaluate(pa.table({KEY: [1, 2, 3]}), configs)
    assert [d["success"] for d in documents] == [True, True, True, False, False]
    assert documents[-1]["exception_info"]["raised_exception"] is True
    assert '"gone"' in documents[-1]["exception_info"]["exception_message"]
