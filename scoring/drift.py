"""Drift between the live version's predictions and a new run's, per output.

Pure functions (``psi``, ``ks``, ``moved_share``, ``judge``) take arrays; ``compare_runs``
reads both runs' sorted output parts (a sample of keys when they are large) and
applies them. Nothing here talks to the store or decides to publish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchscore.core import storage
from scoring.quality import DriftRules

PSI_BINS = 10
PSI_FLOOR = 1e-4  # a bin share of 0 would make PSI infinite


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Bins are the deciles of ``expected`` plus open-ended bins below its minimum and
    above its maximum, so the index is 0 for identical distributions; by the usual
    reading < 0.1 is stable, 0.1–0.25 a moderate and > 0.25 a large shift.
    """
    expected, actual = _finite(expected), _finite(actual)
    if len(expected) == 0 or len(actual) == 0:
        return 0.0
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    # Open-ended outer bins catch new values beyond the live range; the nudged top edge
    # keeps the live maximum apart from them (a constant live output is one bin).
    edges = np.concatenate([[-np.inf], edges[:-1], [np.nextafter(edges[-1], np.inf), np.inf]])
    share_e = np.clip(np.histogram(expected, edges)[0] / len(expected), PSI_FLOOR, None)
    share_a = np.clip(np.histogram(actual, edges)[0] / len(actual), PSI_FLOOR, None)
    return float(np.sum((share_a - share_e) * np.log(share_a / share_e)))


def ks(expected: np.ndarray, actual: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic (largest gap between the CDFs), in [0, 1]."""
    from scipy.stats import ks_2samp

    expected, actual = _finite(expected), _finite(actual)
    if len(expected) == 0 or len(actual) == 0:
        return 0.0
    return float(ks_2samp(expected, actual).statistic)


def moved_share(before: np.ndarray, after: np.ndarray, delta: float) -> float:
    """Share of keys (aligned arrays) whose prediction changed by more than ``delta``."""
    if len(before) == 0:
        return 0.0
    return float(np.mean(np.abs(after.astype(np.float64) - before.astype(np.float64)) > delta))


@dataclass(frozen=True)
class OutputDrift:
    output: str
    metric: str
    distance: float
    max_distance: float
    moved_share: float
    max_moved_share: float
    moved_delta: float
    joined_keys: int

    @property
    def drifted(self) -> bool:
        return self.distance > self.max_distance or self.moved_share > self.max_moved_share

    def describe(self) -> str:
        return (
            f"output '{self.output}': {self.metric.upper()} {self.distance:.3f} "
            f"(max {self.max_distance:g}), {self.moved_share:.1%} of {self.joined_keys:,} keys "
            f"moved by more than {self.moved_delta:g} (max {self.max_moved_share:.1%})"
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"drifted": self.drifted}


def judge(
    output: str, live: np.ndarray, new: np.ndarray, live_joined: np.ndarray,
    new_joined: np.ndarray, rules: DriftRules,
) -> OutputDrift:  # fmt: skip
    """Distance on the distributions, moved share on the key-joined pairs."""
    distance = psi(live, new) if rules.metric == "psi" else ks(live, new)
    return OutputDrift(
        output=output,
        metric=rules.metric,
        distance=distance,
        max_distance=rules.max_distance,
        moved_share=moved_share(live_joined, new_joined, rules.moved_delta),
        max_moved_share=rules.max_moved_share,
        moved_delta=rules.moved_delta,
        joined_keys=len(live_joined),
    )


@dataclass(frozen=True)
class Samples:
    """Per output: the live and new values, and the key-joined pairs."""

    live: dict[str, np.ndarray]
    new: dict[str, np.ndarray]
    live_joined: dict[str, np.ndarray]
    new_joined: dict[str, np.ndarray]


def read_samples(
    live_parts: Sequence[str | Path], new_parts: Sequence[str | Path], key: str, live_key: str,
    outputs: Sequence[str], sample_rows: int, seed: int = 0,
) -> Samples:  # fmt: skip
    """Read both runs' key and outputs; sample rows (seeded) when more than ``sample_rows``.

    Keys are joined on the full columns, then the joined pairs are sampled, so the
    moved share is estimated from up to ``sample_rows`` keys present in both runs.
    """
    live = _read(live_parts, live_key, outputs)
    new = _read(new_parts, key, outputs)
    live = live.rename_columns(["__key", *live.column_names[1:]])
    new = new.rename_columns(["__key", *new.column_names[1:]])
    shared = [o for o in outputs if o in live.column_names]
    joined = _sample(_join(live, new, shared), sample_rows, seed)
    live, new = _sample(live, sample_rows, seed), _sample(new, sample_rows, seed + 1)
    return Samples(
        live={o: _numpy(live[o]) for o in shared},
        new={o: _numpy(new[o]) for o in outputs},
        live_joined={o: _numpy(joined[f"{o}__live"]) for o in shared},
        new_joined={o: _numpy(joined[f"{o}__new"]) for o in shared},
    )


def _join(live: pa.Table, new: pa.Table, shared: Sequence[str]) -> pa.Table:
    """Inner join on ``__key``; keys of different types (int vs string) compare as strings."""
    if live.num_rows == 0 or not shared:
        empty = {
            f"{o}__{side}": pa.array([], pa.float64()) for o in shared for side in ("live", "new")
        }
        return pa.table(empty) if empty else pa.table({"__key": pa.array([], pa.string())})
    if live.schema.field("__key").type != new.schema.field("__key").type:
        live = live.set_column(0, "__key", pc.cast(live["__key"], pa.string()))
        new = new.set_column(0, "__key", pc.cast(new["__key"], pa.string()))
    return live.select(["__key", *shared]).join(
        new.select(["__key", *shared]), "__key", join_type="inner",
        left_suffix="__live", right_suffix="__new",
    )  # fmt: skip


def _read(parts: Sequence[str | Path], key: str, outputs: Sequence[str]) -> pa.Table:
    """The key and outputs of the parts that exist (local files, or objects of one store)."""
    existing = [str(p) for p in parts if storage.exists(p)]
    if not existing:
        return pa.table({key: pa.array([], pa.int64())})
    names = storage.open_parquet(existing[0]).schema_arrow.names
    filesystem, _ = storage.resolve(existing[0])
    paths = [storage.resolve(p)[1] for p in existing]
    columns = [key, *[o for o in outputs if o in names]]
    return pq.ParquetDataset(paths, filesystem=filesystem).read(columns=columns)


def _sample(table: pa.Table, rows: int, seed: int) -> pa.Table:
    if table.num_rows <= rows:
        return table
    picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    return table.take(pa.array(picked))


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]
