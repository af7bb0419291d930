"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lookup.bodies import json_response
from lookup.routing import LeanRoute
from lookup.schemas import ErrorBody
from lookup.service import Lookup


def ops_routes(lookup: Lookup) -> APIRouter:
    router = APIRouter(route_class=LeanRoute, tags=["ops"])
    ok = orjson.dumps({"status": "ok"})

    @router.get("/healthz")
    async def healthz() -> Response:
        """The process is alive (and the cheapest route of this stack)."""
        return Response(ok, media_type="application/json")

    @router.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> Response:
        """Ready: the store answers ("ready"), or a batch fallback can ("degraded")."""
        return json_response(await lookup.ready())

    @router.get("/metrics", response_class=Response)
    async def metrics_route() -> Response:
        return Response(generate_latest(lookup.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
