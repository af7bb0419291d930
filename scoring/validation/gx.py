"""Great Expectations, imported once per process on first use, never at module import."""

from __future__ import annotations

import gc
import os
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext


def import_gx() -> ModuleType:
    """GX, imported once per process, on first use (a large package: seconds of CPU), with
    the cyclic garbage collector paused meanwhile. The import leaves next to no garbage,
    but each full collection its allocations trigger walks every object the process has
    loaded so far (torch, MLflow, pandas): work that grows with what is loaded and frees
    nothing. A caller that had the collector off finds it off still."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    collecting = gc.isenabled()
    gc.disable()
    try:
        import great_expectations as gx
    finally:
        if collecting:
            gc.enable()
    return gx


def gx_version() -> str:
    import great_expectations as gx

    return str(gx.__version__)


def ephemeral_context(gx: ModuleType) -> AbstractDataContext:
    """A context that keeps nothing on disk, without progress bars in the logs."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context: AbstractDataContext = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context
