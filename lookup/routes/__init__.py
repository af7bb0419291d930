"""The API's routes, one router per concern, each built around the objects its handlers use.

Every handler holds what it needs (``Guard``, ``Lookup``, the settings) in its closure
rather than reading ``request.app.state``: Starlette's ``State.__getattr__`` would run on
every request for values that never change. The routers use ``LeanRoute`` so that a
handler with nothing for FastAPI to solve is called directly (``lookup.routing``).
"""

from __future__ import annotations

from lookup.routes.namespaces import namespace_routes
from lookup.routes.ops import ops_routes
from lookup.routes.predictions import prediction_routes

__all__ = ["namespace_routes", "ops_routes", "prediction_routes"]
