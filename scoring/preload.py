"""Dask preload for long-lived workers: ``dask worker <scheduler> --preload scoring.preload``.

A worker of a cluster that outlives the runs (docker-compose's ``dask-worker``, any
``dask worker`` pointed at by ``BATCHSCORE_CLUSTER=tcp://...``) would otherwise import
torch and MLflow's PyTorch flavour inside the first run that needs them, and Great
Expectations inside the first run whose Data Docs it builds (``jobs.data_docs``): seconds
of the worker's CPU (they are large packages), spent while that run waits; a GPU worker's
CUDA context and cuBLAS start on the first batch otherwise. Preloaded, the worker pays
them once as it starts, and every run on it, the first included, begins with its model
load. A cluster started for one run does not preload: there the imports cost
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
        warm_cuda()
    finally:
        if collecting:
            gc.enable()
    gc.freeze()
    return time.perf_counter() - started


def warm_cuda() -> bool:
    """On a worker with a GPU, create its CUDA context and load cuBLAS now (a matrix
    product on the device), so that a run's first batch does not wait for them: seconds
    on a first use. False without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return False
    square = torch.ones(64, 64, device="cuda")
    (square @ square).sum().item()  # synchronises: the work is done when this returns
    return True


def dask_setup(worker: object) -> None:
    """Dask's preload hook, run in the worker process before it joins the scheduler."""
    log.info("batchscore preload: torch, MLflow, GX (and CUDA) ready in %.1f s", preload())
