"""The answers' JSON: built as plain dicts (shapes in ``lookup.schemas``) and encoded once
with orjson, with the prediction decoded straight from the stored bytes."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import orjson
from fastapi.responses import Response

from kv_export.encoding import VALUE_DTYPE, unpack_value
from kv_export.store import NamespaceState, VersionInfo
from lookup.schemas import ItemBody, NamespaceBody, Source
from lookup.service import Answer

JSON = "application/json"
JSON_HEADER = (b"content-type", JSON.encode("latin-1"))
TAILS_KEPT = 256  # answer tails cached (a few per live version and canary of each namespace)


class JsonOk(Response):
    """A 200 answer of JSON bytes, as ``Response(body, media_type=JSON)`` makes it (the same
    status, body and headers in the same order) without Starlette's general constructor:
    no rendering of the content and no header mapping to look through, on every lookup."""

    media_type = JSON

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)), JSON_HEADER]


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    if status == 200 and headers is None:
        return JsonOk(orjson.dumps(body))
    return Response(orjson.dumps(body), status, headers, media_type=JSON)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def prediction(value: bytes, outputs: list[str]) -> dict[str, float]:
    """``kv_export.encoding.unpack_value`` for the hot path: one precompiled ``struct``
    per output count instead of a numpy array per value (same little-endian float32)."""
    try:
        numbers = _float32s(len(outputs)).unpack(value)
    except struct.error:
        return unpack_value(value, outputs)  # raises its ValueError naming the mismatch
    return dict(zip(outputs, numbers))  # noqa: B905 (one number per output by construction)


@lru_cache(maxsize=64)
def _float32s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}f")


assert VALUE_DTYPE == np.dtype("<f4"), "prediction() decodes little-endian float32"


def answer_body(key: str, answer: Answer) -> ItemBody:
    """A key's answer (``PredictionOut``); a batch adds its ``status`` (``found_item``)."""
    info = answer.info
    return {
        "key": key,
        "prediction": prediction(answer.value, info.outputs),
        "model": {"name": info.model_name, "version": info.model_version},
        "run_id": info.run_id,
        "mlflow_run_id": info.mlflow_run_id,
        "scored_at": info.scored_at,
        "source": answer.source,
        "stale": answer.stale,
        "version": info.version,
        "canary": answer.canary,
    }


def answer_json(key: str, answer: Answer) -> bytes:
    """``orjson.dumps(answer_body(key, answer))``, byte for byte, for the single-key route:
    only the key and the prediction are encoded per request; the rest of the body is the
    same for every key answered from one version record with one source, staleness and
    canary flag, so it is encoded once (``_answer_tail``)."""
    head = orjson.dumps({"key": key, "prediction": prediction(answer.value, answer.info.outputs)})
    return head[:-1] + _answer_tail(answer.info, answer.source, answer.stale, answer.canary)


_tails: dict[tuple[int, Source, bool, bool], tuple[VersionInfo, bytes]] = {}


def _answer_tail(info: VersionInfo, source: Source, stale: bool, canary: bool) -> bytes:
    """``answer_body`` after the prediction, encoded: ``,"model":...,"canary":...}``.

    Cached by the identity of ``info``, which the entry holds (so that identity cannot be
    reused while cached). A version record read from the store is never changed in place:
    the live cache replaces whole namespace states, so a new read is a new object and a
    new entry; the oldest entries go first once ``TAILS_KEPT`` are held."""
    found = _tails.get((id(info), source, stale, canary))
    if found is not None and found[0] is info:
        return found[1]
    body = orjson.dumps(
        {
            "model": {"name": info.model_name, "version": info.model_version},
            "run_id": info.run_id,
            "mlflow_run_id": info.mlflow_run_id,
            "scored_at": info.scored_at,
            "source": source,
            "stale": stale,
            "version": info.version,
            "canary": canary,
        }
    )
    tail = b"," + body[1:]
    if len(_tails) >= TAILS_KEPT:
        del _tails[next(iter(_tails))]
    _tails[(id(info), source, stale, canary)] = (info, tail)
    return tail


def found_item(key: str, answer: Answer) -> ItemBody:
    """A batch's item for a key found: its answer with ``"status": "found"`` (one dict built,
    not copied into another)."""
    item = answer_body(key, answer)
    item["status"] = "found"
    return item


def describe(namespace: str, state: NamespaceState) -> NamespaceBody | None:
    info = state.live_info()
    if info is None:
        return None
    age = None
    if info.published_at:
        age = (datetime.now(UTC) - datetime.fromisoformat(info.published_at)).total_seconds()
    return {
        "namespace": namespace,
        "live_version": info.version,
        "model": {"name": info.model_name, "version": info.model_version},
        "run_id": info.run_id,
        "mlflow_run_id": info.mlflow_run_id,
        "scored_at": info.scored_at,
        "published_at": info.published_at,
        "age_seconds": age,
        "key_count": info.key_count,
        "kept_versions": state.history,
        "canary": (
            {"version": canary.version, "percent": canary.percent, "started_at": canary.started_at}
            if (canary := state.canary) is not None
            else None
        ),
    }
