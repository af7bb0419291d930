"""The lookups: one key, or a batch of keys, from a namespace's live version."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from batchscore.core.settings import ApiSettings
from lookup.bodies import JsonOk, answer_json, found_item, json_response
from lookup.errors import ApiError
from lookup.guard import Guard
from lookup.routing import LeanRoute
from lookup.schemas import (
    BATCH_BODY,
    ERRORS,
    SECURED,
    BatchRequest,
    BatchResponse,
    ErrorBody,
    ItemBody,
    MissingBody,
    PredictionOut,
)
from lookup.service import Answer, Lookup, Miss


def prediction_routes(settings: ApiSettings, guard: Guard, lookup: Lookup) -> APIRouter:
    router = APIRouter(route_class=LeanRoute, tags=["predictions"])

    @router.get(
        "/v1/predictions/{namespace}/{key}",
        response_model=PredictionOut,
        responses=ERRORS,
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
            role = "canary" if info.version != _live(lookup, namespace) else "live"
            raise ApiError(
                404,
                "key_not_found",
                f"Key '{key}' is not in the {role} version {info.version} of namespace "
                f"'{namespace}'",
            )
        return JsonOk(answer_json(key, answer))

    @router.post(
        "/v1/predictions/{namespace}/batch",
        response_model=BatchResponse,
        responses=ERRORS | {413: {"model": ErrorBody}},
        openapi_extra=SECURED | BATCH_BODY,
    )
    async def get_batch(namespace: str, request: Request) -> Response:
        """The body is read (bounded) only once the caller is authenticated and may read the
        namespace: an unauthenticated body is never read."""
        guard.namespace(guard.caller(request), namespace)
        keys = batch_keys(await read_body(request, settings.body_limit), settings)
        for key in keys:
            guard.key(key)
        source, answers = await lookup.find(namespace, keys)
        request.state.source = source
        missing: dict[int, MissingBody] = {}  # one body per version missed in (two at most)
        results: list[ItemBody | dict[str, object]] = []
        for key, a in zip(keys, answers, strict=True):
            if isinstance(a, Answer):
                results.append(found_item(key, a))
                continue
            body = missing.get(id(a))
            if body is None:
                body = missing[id(a)] = not_found(a)
            results.append({"key": key, **body})
        return json_response({"results": results})

    return router


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


def batch_keys(body: bytes, settings: ApiSettings) -> list[str]:
    """The batch's keys, within the settings' bound (the model's own bound is the largest
    any setting allows)."""
    keys = batch_request(body).keys
    if len(keys) > settings.max_batch_keys:
        raise ApiError(
            413,
            "too_many_keys",
            f"A batch holds at most {settings.max_batch_keys} keys; got {len(keys)}",
        )
    return keys


def _live(lookup: Lookup, namespace: str) -> int | None:
    state = lookup.cache.current(namespace)
    return state.live if state is not None else None


def not_found(miss: Miss) -> MissingBody:
    """A batch's item for a key its version lacks, less the key: one per version missed."""
    info = miss.info
    return {
        "status": "not_found",
        "prediction": None,
        "model": {"name": info.model_name, "version": info.model_version},
        "run_id": info.run_id,
        "mlflow_run_id": info.mlflow_run_id,
        "scored_at": info.scored_at,
        "source": miss.source,
        "stale": False,
        "version": info.version,
        "canary": miss.canary,
    }
