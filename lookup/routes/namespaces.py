"""What each namespace serves: its live version, model, run and age."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kv_export.errors import StoreUnavailable
from lookup.bodies import describe, json_response
from lookup.errors import ApiError, NamespaceStateInvalid
from lookup.guard import Guard
from lookup.routing import LeanRoute
from lookup.schemas import ERRORS, SECURED, NamespaceBody, NamespaceList, NamespaceOut
from lookup.security import Principal
from lookup.service import Lookup

LISTED_AT_MOST = 1000


def namespace_routes(guard: Guard, lookup: Lookup) -> APIRouter:
    router = APIRouter(route_class=LeanRoute, tags=["namespaces"], responses=ERRORS)

    @router.get("/v1/namespaces", response_model=NamespaceList, openapi_extra=SECURED)
    async def list_namespaces(request: Request) -> Response:
        """Namespaces this key may read that have a live version (from the cache if the
        store is down)."""
        principal = guard.caller(request)
        try:
            names = await lookup.breaker.call(lookup.reader.namespaces)
            source = "store"
        except StoreUnavailable:
            names, source = sorted(lookup.cache.cached()), "cache"
        described = await _describe_all(lookup, principal, names[:LISTED_AT_MOST])
        return json_response({"namespaces": described, "source": source})

    @router.get("/v1/namespaces/{namespace}", response_model=NamespaceOut, openapi_extra=SECURED)
    async def get_namespace(namespace: str, request: Request) -> Response:
        guard.namespace(guard.caller(request), namespace)
        found = describe(namespace, await lookup.state(namespace))
        if found is None:
            raise ApiError(
                404, "namespace_not_found", f"Namespace '{namespace}' has no live version"
            )
        return json_response(found)

    return router


async def _describe_all(
    lookup: Lookup, principal: Principal, names: list[str]
) -> list[NamespaceBody]:
    """The namespaces ``principal`` may read that have a live version; one whose state
    cannot be read now is left out, not an error of the whole list."""
    described = []
    for name in names:
        if not principal.may_read(name):
            continue
        try:
            found = describe(name, await lookup.cache.state(name))
        except (StoreUnavailable, NamespaceStateInvalid):
            continue
        if found is not None:
            described.append(found)
    return described
