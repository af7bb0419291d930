"""The scoring core: ``(model, features) -> predictions``, pure and I/O-free."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Predict = Callable[[np.ndarray], np.ndarray]


def score_batch(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Run one forward pass; return a (rows, outputs) float32 array.

    ``features`` is a (rows, n_features) float32 array. The model sees exactly
    these rows, in this order, and its outputs come back in the same order.
    """
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    return as_matrix(out)


def score_in_batches(predict: Predict, features: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``predict`` over row batches of at most ``batch_size`` rows."""
    if len(features) <= batch_size:
        return predict(features)
    chunks = [predict(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
    return np.concatenate(chunks)


def as_matrix(out: object) -> np.ndarray:
    """Model outputs (tensor, tuple of tensors, array, frame) as a 2-D float32 array."""
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        out = torch.cat([o.reshape(len(o), -1) for o in out], dim=1)
    if isinstance(out, torch.Tensor):
        out = out.detach().to("cpu", torch.float32).numpy()
    elif hasattr(out, "to_numpy"):
        out = out.to_numpy()
    matrix = np.asarray(out, dtype=np.float32)
    return matrix.reshape(len(matrix), -1)
