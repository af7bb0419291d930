"""Pictures for people: each output's distribution, live version against the new run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def plot_distributions(
    new: Mapping[str, np.ndarray], live: Mapping[str, np.ndarray], path: Path, title: str
) -> Path:
    """One histogram panel per output (shared bins for live and new); writes a PNG.

    An output without live values (first publish) shows the new run alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(new)
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3.5))
    for axis, name in zip(np.atleast_1d(axes), names, strict=False):
        values = [v[np.isfinite(v)] for v in (live.get(name, np.empty(0)), new[name])]
        both = np.concatenate(values)
        bins = np.histogram_bin_edges(both, bins=50) if len(both) else 10
        if len(values[0]):
            axis.hist(values[0], bins=bins, alpha=0.5, density=True, label="live")
        axis.hist(values[1], bins=bins, alpha=0.5, density=True, label="new")
        axis.set_title(name)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
