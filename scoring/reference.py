"""Reference models for the demo, the tests and the benchmarks.

They live in the package (not in a script) so that a model logged in MLflow's
``pickle`` format can be unpickled on any Dask worker that has batchscore.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A plain multi-layer perceptron: ``features → hidden… → outputs``."""

    def __init__(
        self,
        n_features: int,
        hidden: tuple[int, ...] = (64,),
        n_outputs: int = 1,
        sigmoid: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
