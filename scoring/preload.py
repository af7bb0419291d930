"""Dask preload for long-lived workers: ``dask worker <scheduler> --preload scoring.preload``.

A worker of a cluster that outlives the runs (docker-compose's ``dask-worker``, any
``dask worker`` pointed at by ``BATCHSCORE_CLUSTER=tcp://...``) would otherwise import
torch and MLflow's PyTorch flavour inside the first run that needs them, and Great
Expectations inside the first run whose Data Docs it builds (``jobs.data_docs``): seconds
of the worker's CPU (they are large packages), spent while that run waits. Preloaded, the
worker pays them once as it starts, and every run on it, the first included, begins with
its model load. A cluster started for one run does not preload: there the imports cost
the same wherever they happen.

What the imports leave behind lives as long as the worker, so it is frozen out of the
garbage collector's reach (``gc.freeze``), as the model plugin does after a load.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def preload() -> float:
    """Import what scoring and the Data Docs need; the seconds it took."""
    started = time.perf_counter()
    collecting = gc.isenabled()
    gc.disable()  # the imports' allocations would trigger full collections over all of it
    try:
        import mlflow.pytorch  # noqa: F401
        import torch  # noqa: F401

        from scoring import engine  # noqa: F401
        from scoring.validation.gx import import_gx

        import_gx()
    finally:
        if collecting:
            gc.enable()
    gc.freeze()
    return time.perf_counter() - started


def dask_setup(worker: object) -> None:
    """Dask's preload hook, run in the worker process before it joins the scheduler."""
    log.info("batchscore preload: torch, MLflow and GX imported in %.1f s", preload())
