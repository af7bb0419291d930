"""A model that takes its time, so that a test can act while shards are in flight.

It lives in an importable module because Dask workers unpickle it.
"""

from __future__ import annotations

import time

import torch

from scoring.reference import MLP


class SlowMLP(MLP):
    def __init__(self, n_features: int, seconds_per_call: float) -> None:
        super().__init__(n_features, hidden=(16,), sigmoid=True)
        self.seconds_per_call = seconds_per_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds_per_call)
        return super().forward(x)
