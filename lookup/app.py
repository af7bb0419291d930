"""The lookup API: precomputed predictions by key, from the namespace's live version.

The hot path is async end to end: the namespace state comes from the in-process
``LiveCache`` (refreshed in the background about every second), a lookup is one
store round trip through the circuit breaker (one multi-get for a batch), and
the answer is encoded once with orjson. The routes are in ``lookup.routes``, the
fallback chain in ``lookup.service``; keys, scopes and rate limits in
``lookup.security`` and ``lookup.guard``.

Errors: every error answer is ``{"error": {"code", "message"}}`` built in the
handlers below; an unexpected exception becomes a generic 500 and its text
never reaches the client.

Run with several workers through the import string ``lookup.app:create_app``
(``factory=True``); each worker builds its app from the cached ``get_settings()``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchscore.core.errors import BatchscoreError
from batchscore.core.names import NAMESPACE_RE  # the rule the API checks (see lookup.guard)
from batchscore.core.settings import ApiSettings, load_settings
from kv_export.store import AsyncPredictionReader
from lookup.bodies import error_response
from lookup.errors import ApiError
from lookup.guard import Guard
from lookup.observability import AccessLog, Metrics, ObserveMiddleware, shared_metrics_dir
from lookup.readers import reader_from_settings
from lookup.routes import namespace_routes, ops_routes, prediction_routes
from lookup.routing import LeanRoute
from lookup.schemas import SECURITY_SCHEMES
from lookup.service import Lookup

__all__ = ["NAMESPACE_RE", "create_app", "get_settings"]

log = logging.getLogger("batchscore.lookup")


@lru_cache
def get_settings() -> ApiSettings:
    return load_settings(ApiSettings)


def create_app(
    settings: ApiSettings | None = None, reader: AsyncPredictionReader | None = None
) -> FastAPI:
    """Build the API; with no arguments (uvicorn ``factory=True``) from ``get_settings()``."""
    settings = settings or get_settings()
    reader = reader or reader_from_settings(settings)
    metrics = Metrics(shared_metrics_dir())
    lookup = Lookup(settings, reader, metrics)
    guard = Guard(settings)
    app = FastAPI(
        title="batchscore lookup API",
        version="1",
        description="Precomputed predictions by key, from the live version of each namespace.",
        lifespan=_lifespan(lookup, metrics, reader),
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
    app.include_router(ops_routes(lookup))
    app.include_router(prediction_routes(settings, guard, lookup))
    app.include_router(namespace_routes(guard, lookup))
    _hot_routes_first(app)
    _document_security(app)
    return app


def _lifespan(
    lookup: Lookup, metrics: Metrics, reader: AsyncPredictionReader
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await lookup.warm()
        settle_heap()
        async with metrics.serving():
            yield
        await reader.close()

    return lifespan


def settle_heap() -> None:
    """Move everything built at startup out of the cyclic garbage collector's sight.

    The process holds a large heap of long-lived objects (FastAPI, pydantic, numpy,
    pyarrow, redis); each full collection walks all of it with the event loop stopped,
    and requests in flight survive long enough to trigger full collections regularly
    under load, so those pauses would set the lookup's tail latency (seen with
    gc.callbacks under bench/serve_bench.py). Frozen objects are never scanned again;
    what requests allocate is collected as before.
    """
    gc.collect()
    gc.freeze()


def _document_security(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:  # FastAPI's own signature
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
