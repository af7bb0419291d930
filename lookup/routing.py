"""``LeanRoute``: FastAPI routes that have nothing to solve skip FastAPI's per-request solving.

For every request FastAPI's route handler opens two ``AsyncExitStack``s and runs
``solve_dependencies``, which builds the query, header and cookie mappings and
validates each declared parameter with pydantic, even when the endpoint declares
nothing but string path parameters; on the single-key lookup, whose own work is small,
that is a large share of the request's Python time. For such endpoints there is
nothing to validate (a path parameter without a converter is already a ``str``),
so ``LeanRoute`` calls them through Starlette's plain ``request_response``.

Everything else stays FastAPI's: the OpenAPI document (built from the same
signature), exception handlers, middleware, and the ordinary path for any
endpoint with a body, a query/header/cookie parameter, a dependency, or a
path parameter of another type.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.convertors import PathConvertor, StringConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, request_response
from starlette.types import Scope

TEXT_CONVERTORS = (StringConvertor, PathConvertor)


def takes_only_request_and_text_path(route: APIRoute) -> bool:
    """The endpoint is a coroutine whose only inputs are (optionally) the ``Request`` and
    every path parameter of the route, each a ``str`` matched without a converter (or
    ``:path``)."""
    d = route.dependant
    return (
        inspect.iscoroutinefunction(route.endpoint)
        and not (d.query_params or d.header_params or d.cookie_params or d.body_params)
        and not d.dependencies
        and d.response_param_name is None
        and d.background_tasks_param_name is None
        and d.security_scopes_param_name is None
        and all(p.field_info.annotation is str for p in d.path_params)
        and {p.name for p in d.path_params} == set(route.param_convertors)
        and all(type(c) in TEXT_CONVERTORS for c in route.param_convertors.values())
    )


class LeanRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.lean = takes_only_request_and_text_path(self)
        if self.lean:
            self.app = request_response(_direct(endpoint, self.dependant.request_param_name))

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """What ``APIRoute.matches`` (Starlette's ``Route.matches`` plus the ``route`` entry)
        returns, for a lean route under an empty root path (the others go to it): a text
        parameter's convertor returns the text matched, so the regex's groups are the path
        parameters as they are, with no call per parameter and no copies. The router tries
        this on every route it walks for every request, so its cost is paid many times.
        """
        if not self.lean or scope["type"] != "http" or scope.get("root_path"):
            return super().matches(scope)
        match = self.path_regex.match(scope["path"])
        if match is None:
            return Match.NONE, {}
        params = match.groupdict()
        if scope.get("path_params"):  # inside a mount that has parameters of its own
            params = {**scope["path_params"], **params}
        child = {"endpoint": self.endpoint, "path_params": params, "route": self}
        if self.methods and scope["method"] not in self.methods:
            return Match.PARTIAL, child
        return Match.FULL, child


def _direct(
    endpoint: Callable[..., Awaitable[Response]], request_name: str | None
) -> Callable[[Request], Awaitable[Response]]:
    if request_name is None:

        async def call_without_request(request: Request) -> Response:
            return await endpoint(**request.path_params)

        return call_without_request

    async def call(request: Request) -> Response:
        return await endpoint(**request.path_params, **{request_name: request})

    return call
