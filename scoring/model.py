"""A downloaded MLflow model as the scoring engine sees it: a predictor for its spec
(``scoring.spec``).

Everything here reads a local model folder (what ``registry`` downloaded once
per run); nothing talks to a tracking server, so Dask workers can load it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from scoring.core import as_matrix, gather_rows, score_batch, score_gathered, score_in_batches
from scoring.spec import ModelSpec

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "bf16", "fp16"]
AUTO_BATCH_CAP = 1 << 20
# On CPU, small batches are the fast ones: a 2,048-row batch's activations stay in cache
# and, for layers narrower than 2,048, below glibc's 32 MiB mmap threshold
# (scoring.engine's WORKER_MALLOC_ENV), so no batch faults in fresh pages; larger batches
# spill activations out of cache and score fewer rows per second on CPU, for narrow and
# wide layers alike. Measured on 2 cores, two threads at once (2026-12-07): the 64-256-256-1
# MLP at 1.05M rows/s with 2,048-row batches against 0.96M with 4,096 (1.07M with 1,024);
# the 64-1024-1024-1 one at 77k against 71k (74k with 1,024). The pyfunc path keeps large
# batches: each call costs pyfunc's schema enforcement, paid once per batch.
CPU_AUTO_BATCH = 2_048
PYFUNC_AUTO_BATCH = 32_768


def pick_device(requested: str = "auto") -> str:
    """``auto`` means the worker's GPU when it has one (dask-cuda sets CUDA_VISIBLE_DEVICES)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Predictor:
    """A loaded model: Arrow table of features in, (rows, outputs) float32 out.

    Torch models run under ``inference_mode`` on ``device``; on CUDA the
    features go through a reused pinned host buffer and non-blocking copies,
    and an out-of-memory batch is halved and retried instead of failing.
    """

    def __init__(
        self,
        model_dir: Path,
        spec: ModelSpec,
        device: str = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        self.spec = spec
        self.device = device
        self.precision = precision
        self._local = threading.local()  # one host buffer per worker thread
        if spec.flavor == "pytorch":
            import mlflow.pytorch

            self._torch = mlflow.pytorch.load_model(str(model_dir)).to(device)
            if hasattr(self._torch, "eval") and spec.serialization == "pickle":
                self._torch.eval()
        else:
            import mlflow.pyfunc

            self._pyfunc = mlflow.pyfunc.load_model(str(model_dir))

    @property
    def path(self) -> str:
        """Which path scores: 'torch-cpu', 'torch-cuda' or 'pyfunc' (the slower, generic one)."""
        return f"torch-{self.device}" if self.spec.flavor == "pytorch" else "pyfunc"

    def auto_batch_size(self) -> int:
        """The largest batch that fits: on CUDA measured from a probe's peak memory."""
        if self.spec.flavor != "pytorch":
            return PYFUNC_AUTO_BATCH
        if self.device != "cuda":
            return CPU_AUTO_BATCH
        import torch

        probe = 4096
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode(), self._autocast():
            self._torch(torch.zeros(probe, len(self.spec.features), device=self.device))
        per_row = max((torch.cuda.max_memory_allocated() - base) / probe, 1.0)
        free, _ = torch.cuda.mem_get_info()
        fits = int(free * 0.5 / per_row)
        return max(1024, min(AUTO_BATCH_CAP, 1 << (fits.bit_length() - 1)))

    def predict(
        self,
        table: pa.Table,
        batch_size: int,
        before_batch: Callable[[], object] | None = None,
    ) -> np.ndarray:
        """``before_batch`` is called before each forward pass of the CPU path (the worker
        sets the thread's share of its cores there: ``scoring.engine.ModelPlugin``)."""
        if self.spec.flavor != "pytorch":
            frame = table.select(list(self.spec.features)).to_pandas()
            return score_in_batches(
                lambda rows: as_matrix(self._pyfunc.predict(frame.iloc[rows[:, 0]])),
                np.arange(len(frame)).reshape(-1, 1),
                batch_size,
            )
        if self.device == "cpu" and self.precision == "fp32":
            return self._predict_on_cpu(table, batch_size, before_batch)
        return self._predict_on_device(table, batch_size)

    def _predict_on_cpu(
        self, table: pa.Table, batch_size: int, before_batch: Callable[[], object] | None
    ) -> np.ndarray:
        """Each batch's rows are gathered from the Arrow columns just before its forward
        pass, into buffers that stay in the core's cache: building the whole table's
        matrix first would take one more pass over memory, on the cores the forward
        passes use."""
        columns = feature_columns(table, self.spec.features)
        width = len(self.spec.features)
        step = max(1, min(batch_size, table.num_rows))
        batch = self._buffer("batch", (step, width))
        scratch = self._buffer("scratch", (width, step))

        def gather(start: int, stop: int) -> np.ndarray:
            if before_batch is not None:
                before_batch()
            return gather_rows(columns, start, stop, batch, scratch)

        return score_gathered(
            lambda rows: score_batch(self._torch, rows), gather, table.num_rows, step
        )

    def _predict_on_device(self, table: pa.Table, batch_size: int) -> np.ndarray:
        import torch

        host = self._host_buffer(table.num_rows)
        feature_matrix(table, self.spec.features, out=host.numpy(), scratch=self._scratch(table))
        outputs = []
        start, size = 0, batch_size
        with torch.inference_mode(), self._autocast():
            while start < table.num_rows:
                try:
                    batch = host[start : start + size].to(self.device, non_blocking=True)
                    outputs.append(self._torch(batch).float())
                except torch.cuda.OutOfMemoryError:
                    if size == 1:
                        raise
                    size //= 2  # halve and retry the same rows
                    torch.cuda.empty_cache()
                    continue
                start += size
        return as_matrix(torch.cat(outputs))  # .cpu() inside synchronises: the buffer is free

    def _host_buffer(self, rows: int) -> torch.Tensor:
        import torch

        pinned = getattr(self._local, "pinned", None)
        if pinned is None or pinned.shape[0] < rows:
            pinned = torch.empty(
                (rows, len(self.spec.features)),
                dtype=torch.float32,
                pin_memory=self.device == "cuda",
            )
            self._local.pinned = pinned
        return pinned[:rows]

    def _buffer(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A float32 array of ``shape`` reused by this thread (grown, never shrunk)."""
        buffer: np.ndarray | None = getattr(self._local, name, None)
        if buffer is None or buffer.size < shape[0] * shape[1]:
            buffer = np.empty(shape[0] * shape[1], dtype=np.float32)
            setattr(self._local, name, buffer)
        return buffer[: shape[0] * shape[1]].reshape(shape)

    def _scratch(self, table: pa.Table) -> np.ndarray:
        return self._buffer("scratch", (len(self.spec.features), table.num_rows))

    def _autocast(self) -> AbstractContextManager[object]:
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device, dtype=dtype)


def feature_matrix(
    table: pa.Table,
    features: tuple[str, ...],
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Arrow columns -> one C-contiguous, writable (rows, features) float32 matrix
    (``gather_rows`` over the whole table; pandas 3 and Arrow hand out read-only column
    buffers). Callers that score many tables pass reused ``out`` and ``scratch`` buffers
    (``out`` is a pinned host buffer on CUDA), so no page is faulted in twice.
    """
    rows = table.num_rows
    matrix = np.empty((rows, len(features)), dtype=np.float32) if out is None else out
    columns = np.empty((len(features), rows), dtype=np.float32) if scratch is None else scratch
    return gather_rows(feature_columns(table, features), 0, rows, matrix, columns)


def feature_columns(table: pa.Table, features: tuple[str, ...]) -> list[np.ndarray]:
    """Each feature column as one 1-D array, in ``features`` order: Arrow's own buffer
    where it can be (one chunk, no nulls), else a copy with NaN for nulls."""
    found = []
    for name in features:
        column = table.column(name)
        found.append(column.to_numpy() if column.null_count == 0 else _with_nan(column))
    return found


def _with_nan(column: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.cast(column, pa.float32()).to_numpy(zero_copy_only=False)
