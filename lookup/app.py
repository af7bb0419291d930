"""The lookup API: precomputed predictions by key, from the namespace's live version.

The live-version record is cached in the process for ``live_cache_seconds``,
so a request costs one store round trip (one multi-get for a batch). When the
store cannot be reached, the API answers from the live run's batch output,
which it finds from the version record it last read from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from batchscore.errors import BatchscoreError
from batchscore.settings import ApiSettings, load_settings
from kv_export.encoding import unpack_value
from kv_export.errors import StoreUnavailable, VersionNotFound
from kv_export.store import PredictionStore, VersionInfo, open_store
from lookup.fallback import BatchOutput

log = logging.getLogger("batchscore.lookup")


class ModelRef(BaseModel):
    name: str
    version: str


class PredictionOut(BaseModel):
    key: str
    prediction: dict[str, float]
    model: ModelRef
    run_id: str
    scored_at: str
    source: Literal["kv", "batch"]
    stale: bool = False


class BatchRequest(BaseModel):
    keys: list[str] = Field(min_length=1, description="Keys to look up.")


class BatchItem(BaseModel):
    key: str
    status: Literal["found", "not_found"]
    prediction: dict[str, float] | None = None
    model: ModelRef
    run_id: str
    scored_at: str
    source: Literal["kv", "batch"]
    stale: bool = False


class BatchResponse(BaseModel):
    results: list[BatchItem]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LiveCache:
    """The live version of each namespace, re-read from the store at most every ``ttl`` s.

    When the store cannot be reached the last record read stays in use, which is
    what lets the batch fallback find the live run's output.
    """

    def __init__(self, store: PredictionStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._entries: dict[str, tuple[float, VersionInfo | None]] = {}
        self._lock = threading.Lock()

    def live(self, namespace: str) -> VersionInfo | None:
        now = time.monotonic()
        entry = self._entries.get(namespace)
        if entry is not None and now - entry[0] < self._ttl:
            return entry[1]
        try:
            info = self._store.state(namespace).live_info()
        except StoreUnavailable:
            if entry is None:
                raise
            return entry[1]
        with self._lock:
            self._entries[namespace] = (now, info)
        return info


class Lookup:
    def __init__(self, settings: ApiSettings, store: PredictionStore) -> None:
        self.settings = settings
        self.store = store
        self.cache = LiveCache(store, settings.live_cache_seconds)

    def find(
        self, namespace: str, keys: Sequence[str]
    ) -> tuple[VersionInfo, list[bytes | None], Literal["kv", "batch"]]:
        try:
            info = self.cache.live(namespace)
        except StoreUnavailable as exc:
            log.warning("store unavailable and no cached version for %s: %s", namespace, exc)
            raise ApiError(503, "store_unavailable", "The prediction store is unavailable") from None
        if info is None:
            raise ApiError(
                404, "namespace_not_found", f"Namespace '{namespace}' has no live version"
            )
        try:
            return info, self.store.get_many(namespace, info, [k.encode() for k in keys]), "kv"
        except StoreUnavailable as exc:
            if not self.settings.batch_fallback or not info.parts:
                raise ApiError(
                    503, "store_unavailable", "The prediction store is unavailable"
                ) from None
            log.warning("store unavailable, answering %s from batch output: %s", namespace, exc)
            return info, BatchOutput(info).get_many(keys), "batch"


def _model(info: VersionInfo) -> ModelRef:
    return ModelRef(name=info.model_name, version=info.model_version)


def get_lookup(request: Request) -> Lookup:
    return request.app.state.lookup  # type: ignore[no-any-return]


LookupDep = Annotated[Lookup, Depends(get_lookup)]


@lru_cache
def get_settings() -> ApiSettings:
    return load_settings(ApiSettings)


def create_app(settings: ApiSettings | None = None, store: PredictionStore | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = store or open_store(
        settings.resolved_store_url, timeout_seconds=settings.store_timeout_seconds
    )
    app = FastAPI(
        title="batchscore lookup API",
        version="1",
        description="Precomputed predictions by key, from the live version of each namespace.",
    )
    app.state.lookup = Lookup(settings, store)

    errors: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody}, 503: {"model": ErrorBody}
    }

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status)

    @app.exception_handler(BatchscoreError)
    async def _domain_error(_: Request, exc: BatchscoreError) -> JSONResponse:
        status = 404 if isinstance(exc, VersionNotFound) else 503
        code = "not_found" if status == 404 else "unavailable"
        return JSONResponse({"error": {"code": code, "message": exc.what}}, status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse({"error": {"code": "internal", "message": "Internal error"}}, 500)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    def readyz(lookup: LookupDep) -> Any:
        try:
            lookup.store.ping()
        except StoreUnavailable:
            return JSONResponse(
                {"error": {"code": "store_unavailable", "message": "Store unreachable"}}, 503
            )
        return {"status": "ready"}

    @app.get(
        "/v1/predictions/{namespace}/{key}",
        response_model=PredictionOut,
        responses=errors,
        tags=["predictions"],
    )
    def get_prediction(namespace: str, key: str, lookup: LookupDep) -> PredictionOut:
        info, values, source = lookup.find(namespace, [key])
        if values[0] is None:
            raise ApiError(
                404,
                "key_not_found",
                f"Key '{key}' is not in the live version {info.version} of namespace "
                f"'{namespace}'",
            )
        return PredictionOut(
            key=key,
            prediction=unpack_value(values[0], info.outputs),
            model=_model(info),
            run_id=info.run_id,
            scored_at=info.scored_at,
            source=source,
        )

    @app.post(
        "/v1/predictions/{namespace}/batch",
        response_model=BatchResponse,
        responses=errors | {413: {"model": ErrorBody}},
        tags=["predictions"],
    )
    def get_batch(namespace: str, body: BatchRequest, lookup: LookupDep) -> BatchResponse:
        if len(body.keys) > settings.max_batch_keys:
            raise ApiError(
                413,
                "too_many_keys",
                f"A batch holds at most {settings.max_batch_keys} keys; got {len(body.keys)}",
            )
        info, values, source = lookup.find(namespace, body.keys)
        model = _model(info)
        return BatchResponse(
            results=[
                BatchItem(
                    key=key,
                    status="found" if value is not None else "not_found",
                    prediction=unpack_value(value, info.outputs) if value is not None else None,
                    model=model,
                    run_id=info.run_id,
                    scored_at=info.scored_at,
                    source=source,
                )
                for key, value in zip(body.keys, values, strict=True)
            ]
        )

    return app
