"""The single-key route's encoded answer is ``orjson.dumps(answer_body(...))`` byte for
byte, for every combination of what an answer carries, and ``JsonOk`` is the response
Starlette's ``Response`` makes of the same bytes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import orjson
import pytest
from fastapi.responses import Response

from kv_export.encoding import pack_values
from kv_export.state import VersionInfo
from lookup import bodies
from lookup.service import Answer

OUTPUTS = [["churn_probability"], ["p0", "p1", "p2"]]
VALUES = [0.25, -1.5e-7, math.nan, math.inf, 3.4e38]
KEYS = ["42", "cust-Ünïcode-\u00e9", 'quote"and\\slash', "x" * 200]


def info(outputs: list[str], mlflow_run_id: str | None, version: int = 7) -> VersionInfo:
    return VersionInfo(
        version=version,
        run_id="run-20261207",
        outputs=outputs,
        model_name="churn",
        model_version="3",
        scored_at="2026-12-07T05:00:00+00:00",
        key_column="customer_id",
        mlflow_run_id=mlflow_run_id,
    )


@pytest.mark.parametrize(
    ("outputs", "value", "mlflow_run_id"),
    itertools.product(OUTPUTS, VALUES, [None, "abc123"]),
)
def test_the_encoded_answer_is_the_bodys_json(
    outputs: list[str], value: float, mlflow_run_id: str | None
) -> None:
    record = info(outputs, mlflow_run_id)
    stored = pack_values(np.full((1, len(outputs)), value, dtype=np.float32))[0]
    for key, source, stale, canary in itertools.product(
        KEYS, ("kv", "batch"), (False, True), (False, True)
    ):
        answer = Answer(stored, record, source, stale, canary)  # type: ignore[arg-type]
        expected = orjson.dumps(bodies.answer_body(key, answer))
        assert bodies.answer_json(key, answer) == expected
        assert bodies.answer_json(key, answer) == expected  # from the cached tail


def test_a_new_version_record_is_never_answered_with_an_older_ones_tail() -> None:
    stored = pack_values(np.array([[0.5]], dtype=np.float32))[0]
    for version in range(bodies.TAILS_KEPT + 10):
        record = info(["p"], None, version=version)
        body = orjson.loads(bodies.answer_json("k", Answer(stored, record, "kv", False, False)))
        assert body["version"] == version
    assert len(bodies._tails) <= bodies.TAILS_KEPT


def test_json_ok_is_the_response_starlette_makes() -> None:
    body = b'{"key":"42"}'
    ours, theirs = bodies.JsonOk(body), Response(body, media_type=bodies.JSON)
    assert (ours.status_code, ours.body, ours.raw_headers) == (
        theirs.status_code,
        theirs.body,
        theirs.raw_headers,
    )
