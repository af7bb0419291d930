"""The lookup API: precomputed predictions by key, from the namespace's live version.

The hot path is async end to end: the namespace state comes from the in-process
``LiveCache`` (refreshed in the background about every second), a lookup is one
store round trip through the circuit breaker (one multi-get for a batch), and
the answer is encoded once with orjson. The fallback chain is in
``lookup.service``; keys, scopes and rate limits in ``lookup.security``.

Errors: every error answer is ``{"error": {"code", "message"}}`` built in the
handlers below; an unexpected exception becomes a generic 500 and its text
never reaches the client.

Run with several workers through the import string ``lookup.app:create_app``
(``factory=True``); each worker builds its app from the cached ``get_settings()``.
"""

from __future__ import annotations

import gc
import logging
import re
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchscore.core.errors import BatchscoreError
from batchscore.core.names import NAMESPACE_RE
from batchscore.core.settings import ApiSettings, load_settings
from kv_export.encoding import VALUE_DTYPE, unpack_value
from kv_export.errors import StoreUnavailable
from kv_export.store import AsyncPredictionReader, NamespaceState
from lookup.errors import ApiError, NamespaceStateInvalid
from lookup.observability import AccessLog, Metrics, ObserveMiddleware, shared_metrics_dir
from lookup.readers import reader_from_settings
from lookup.routing import LeanRoute
from lookup.security import ANONYMOUS, ApiKeys, Principal, RateLimiter, presented_key
from lookup.service import Answer, Lookup

log = logging.getLogger("batchscore.lookup")

KEY_CHARACTERS = "A-Za-z0-9._:@+=~-"
KEY_RE = re.compile(f"[{KEY_CHARACTERS}]+")


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


MAX_KEY_LENGTH = 4096  # the largest BATCHSCORE_MAX_KEY_LENGTH
MAX_BATCH_KEYS = 100_000  # the largest BATCHSCORE_MAX_BATCH_KEYS
BatchKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]


class BatchRequest(BaseModel):
    """The bounds here hold whatever the settings say; the settings' own (smaller) bounds
    are checked after parsing, and the body's size before it is read."""

    keys: list[BatchKey] = Field(
        min_length=1, max_length=MAX_BATCH_KEYS, description="Keys to look up."
    )


BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": BatchRequest.model_json_schema()}},
    }
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is known to exceed ``limit``: by
    its Content-Length before a byte is read, or while it is read (chunked), so a large
    body never sits in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"A request body holds at most {limit} bytes (BATCHSCORE_MAX_BODY_BYTES)",
    )


def batch_request(body: bytes) -> BatchRequest:
    try:
        return BatchRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


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


class NamespaceOut(BaseModel):
    namespace: str
    live_version: int
    model: ModelRef
    run_id: str
    scored_at: str
    published_at: str | None
    age_seconds: float | None = Field(description="Seconds since the live version was published.")
    key_count: int
    kept_versions: list[int]


class NamespaceList(BaseModel):
    namespaces: list[NamespaceOut]
    source: Literal["store", "cache"]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


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


def answer_body(key: str, answer: Answer) -> dict[str, Any]:
    info = answer.info
    return {
        "key": key,
        "prediction": prediction(answer.value, info.outputs),
        "model": {"name": info.model_name, "version": info.model_version},
        "run_id": info.run_id,
        "scored_at": info.scored_at,
        "source": answer.source,
        "stale": answer.stale,
    }


def found_item(key: str, answer: Answer) -> dict[str, Any]:
    """A batch's item for a key found: its answer with ``"status": "found"`` (one dict built,
    not copied into another)."""
    item = answer_body(key, answer)
    item["status"] = "found"
    return item


def describe(namespace: str, state: NamespaceState) -> dict[str, Any] | None:
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
        "scored_at": info.scored_at,
        "published_at": info.published_at,
        "age_seconds": age,
        "key_count": info.key_count,
        "kept_versions": state.history,
    }


def settle_heap() -> None:
    """Move everything built at startup out of the cyclic garbage collector's sight.

    The process holds about 100,000 long-lived objects (FastAPI, pydantic, numpy,
    pyarrow, redis); each full collection walked all of them, 35 ms typically and up
    to 80 ms with the event loop stopped, and requests in flight survive long enough
    to trigger one every second or so under load: that was the lookup's p99 (measured
    with gc.callbacks under bench/serve_bench.py). Frozen objects are never scanned
    again; what requests allocate is collected as before.
    """
    gc.collect()
    gc.freeze()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@lru_cache
def get_settings() -> ApiSettings:
    return load_settings(ApiSettings)


class Guard:
    """Authentication, per-key namespace scope, rate limit and input checks."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.keys = ApiKeys.from_settings(settings)
        if not self.keys.enabled:
            log.warning(
                "authentication is off: neither BATCHSCORE_API_KEYS nor "
                "BATCHSCORE_API_KEYS_FILE is set, so every client may read every namespace"
            )
        rate = settings.rate_limit_per_second
        self.limiter = RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None
        failures = settings.auth_failures_per_minute
        self.failures = (
            RateLimiter(
                failures / 60,
                failures,
                refusal="Too many failed authentications from this address",
            )
            if failures > 0 and self.keys.enabled
            else None
        )

    def caller(self, request: Request) -> Principal:
        """The request's principal (auth and rate limit). A plain call, not a FastAPI
        dependency: dependency resolution costs more than the rest of a lookup.

        Failed authentications are limited per client address before any key is checked:
        an address that used up its failures gets 429 whatever key it presents, so that
        guessing cannot go on at the speed of the server."""
        principal = ANONYMOUS
        if self.keys.enabled:  # with authentication off there is no header worth parsing
            principal = self._authenticate(request)
        request.scope.setdefault("state", {})["key_id"] = principal.key_id  # request.state's dict
        if self.limiter is not None:
            self.limiter.check(principal.key_id if self.keys.enabled else client_address(request))
        return principal

    def _authenticate(self, request: Request) -> Principal:
        headers = request.headers
        presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        if self.failures is None:
            return self.keys.authenticate(presented)
        address = client_address(request)
        self.failures.refuse_if_empty(address)
        try:
            return self.keys.authenticate(presented)
        except ApiError:
            self.failures.check(address)  # one failure counted (a token is left: just checked)
            raise

    def namespace(self, principal: Principal, namespace: str) -> None:
        if not NAMESPACE_RE.fullmatch(namespace):
            raise ApiError(
                422, "invalid_namespace", "A namespace is 1-128 characters of A-Z a-z 0-9 . _ -"
            )
        if not principal.may_read(namespace):
            raise ApiError(403, "forbidden", f"This API key may not read namespace '{namespace}'")

    def key(self, key: str) -> None:
        if len(key) > self.settings.max_key_length or not KEY_RE.fullmatch(key):
            raise ApiError(
                422,
                "invalid_key",
                f"A key is 1-{self.settings.max_key_length} characters of {KEY_CHARACTERS}",
            )


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
SECURED: dict[str, Any] = {"security": [{"bearer": []}, {"apiKey": []}]}


def _document_security(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422, 429, 503)
}


def create_app(
    settings: ApiSettings | None = None, reader: AsyncPredictionReader | None = None
) -> FastAPI:
    """Build the API; with no arguments (uvicorn ``factory=True``) from ``get_settings()``."""
    settings = settings or get_settings()
    reader = reader or reader_from_settings(settings)
    metrics = Metrics(shared_metrics_dir())
    lookup = Lookup(settings, reader, metrics)
    guard = Guard(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await lookup.warm()
        settle_heap()
        async with metrics.serving():
            yield
        await reader.close()

    app = FastAPI(
        title="batchscore lookup API",
        version="1",
        description="Precomputed predictions by key, from the live version of each namespace.",
        lifespan=lifespan,
    )
    app.router.route_class = LeanRoute
    app.state.lookup, app.state.guard = lookup, guard
    metrics.watch(lambda: lookup.breaker.state, lookup.cache.cached)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(
        ObserveMiddleware, metrics=metrics, access_log=AccessLog() if settings.access_log else None
    )
    _add_error_handlers(app, metrics)
    _add_ops_routes(app, lookup)
    _add_prediction_routes(app, settings, guard, lookup)
    _add_namespace_routes(app, guard, lookup)
    _hot_routes_first(app)
    _document_security(app)
    return app


def _hot_routes_first(app: FastAPI) -> None:
    """Starlette tries routes in order, a regex match each: the probe and the lookups first,
    the documentation pages last (no two of these paths overlap for one method)."""
    first = {"/healthz": 0, "/v1/predictions/{namespace}/{key}": 1}
    app.router.routes.sort(
        key=lambda r: first.get(getattr(r, "path", ""), 2 if isinstance(r, APIRoute) else 3)
    )


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        metrics.errors.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        metrics.errors.labels("invalid_request").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:10]
        )
        return error_response(422, "invalid_request", f"Invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, f"http_{exc.status_code}", message, headers)

    @app.exception_handler(BatchscoreError)
    async def _domain(_: Request, exc: BatchscoreError) -> Response:
        log.warning("store error: %s", exc)
        metrics.errors.labels("store_error").inc()
        return error_response(503, "store_unavailable", "The prediction store is unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal", "Internal error")


def _add_ops_routes(app: FastAPI, lookup: Lookup) -> None:
    ok = orjson.dumps({"status": "ok"})

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        """The process is alive (and the cheapest route of this stack)."""
        return Response(ok, media_type="application/json")

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def readyz() -> Response:
        """Ready: the store answers ("ready"), or a batch fallback can ("degraded")."""
        return json_response(await lookup.ready())

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics_route() -> Response:
        return Response(generate_latest(lookup.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_prediction_routes(
    app: FastAPI, settings: ApiSettings, guard: Guard, lookup: Lookup
) -> None:
    """The lookups. Every handler here holds ``guard`` and ``lookup`` itself: reading them
    from ``request.app.state`` per request (Starlette's ``State.__getattr__``) cost ~1 µs."""

    @app.get(
        "/v1/predictions/{namespace}/{key}",
        response_model=PredictionOut,
        responses=ERRORS,
        tags=["predictions"],
        openapi_extra=SECURED,
    )
    async def get_prediction(namespace: str, key: str, request: Request) -> Response:
        guard.namespace(guard.caller(request), namespace)
        guard.key(key)
        info, source, answer = await lookup.find_one(namespace, key)
        request.scope.setdefault("state", {})["source"] = (
            source if answer is None else ("stale" if answer.stale else answer.source)
        )
        if answer is None:
            raise ApiError(
                404,
                "key_not_found",
                f"Key '{key}' is not in the live version {info.version} of namespace '{namespace}'",
            )
        return json_response(answer_body(key, answer))

    @app.post(
        "/v1/predictions/{namespace}/batch",
        response_model=BatchResponse,
        responses=ERRORS | {413: {"model": ErrorBody}},
        tags=["predictions"],
        openapi_extra=SECURED | BATCH_BODY,
    )
    async def get_batch(namespace: str, request: Request) -> Response:
        """The body is read (bounded) only once the caller is authenticated and may read the
        namespace: an unauthenticated body is never read."""
        guard.namespace(guard.caller(request), namespace)
        body = batch_request(await read_body(request, settings.body_limit))
        if len(body.keys) > settings.max_batch_keys:
            raise ApiError(
                413,
                "too_many_keys",
                f"A batch holds at most {settings.max_batch_keys} keys; got {len(body.keys)}",
            )
        for key in body.keys:
            guard.key(key)
        info, source, answers = await lookup.find(namespace, body.keys)
        request.state.source = source
        missing = {
            "status": "not_found",
            "prediction": None,
            "model": {"name": info.model_name, "version": info.model_version},
            "run_id": info.run_id,
            "scored_at": info.scored_at,
            "source": source,
            "stale": False,
        }
        results = [
            found_item(key, a) if a is not None else {"key": key, **missing}
            for key, a in zip(body.keys, answers, strict=True)
        ]
        return json_response({"results": results})


def _add_namespace_routes(app: FastAPI, guard: Guard, lookup: Lookup) -> None:
    @app.get(
        "/v1/namespaces",
        response_model=NamespaceList,
        responses=ERRORS,
        tags=["namespaces"],
        openapi_extra=SECURED,
    )
    async def list_namespaces(request: Request) -> Response:
        """Namespaces this key may read that have a live version (from the cache if the
        store is down)."""
        principal = guard.caller(request)
        try:
            names = await lookup.breaker.call(lookup.reader.namespaces)
            source = "store"
        except StoreUnavailable:
            names, source = sorted(lookup.cache.cached()), "cache"
        described = []
        for name in names[:1000]:
            if not principal.may_read(name):
                continue
            try:
                found = describe(name, await lookup.cache.state(name))
            except (StoreUnavailable, NamespaceStateInvalid):
                continue
            if found is not None:
                described.append(found)
        return json_response({"namespaces": described, "source": source})

    @app.get(
        "/v1/namespaces/{namespace}",
        response_model=NamespaceOut,
        responses=ERRORS,
        tags=["namespaces"],
        openapi_extra=SECURED,
    )
    async def get_namespace(namespace: str, request: Request) -> Response:
        guard.namespace(guard.caller(request), namespace)
        found = describe(namespace, await lookup.state(namespace))
        if found is None:
            raise ApiError(
                404, "namespace_not_found", f"Namespace '{namespace}' has no live version"
            )
        return json_response(found)
