"""Quality rules: which input types cast to the model's dtype without loss, and what a
namespace expects of its outputs and of drift against its live version.

Pure functions and plain data: the I/O (footers, config files, GX) is elsewhere.

Castability rule (the engine hands the model one float32 matrix, or float64 for a
``double`` column signature):

- booleans, floats no wider than the target, and integers of at most 16 bits
  (float32) or 32 bits (float64) always cast exactly;
- wider integers cast exactly when every value lies within ±2^24 (float32) or
  ±2^53 (float64): proved from row-group min/max statistics; without them the
  file is refused, since losslessness cannot be shown from the footer;
- float64 into float32 is accepted when every finite value lies within float32's
  range (rounding to 24 bits of mantissa is what a float32 model means; overflow
  to ±inf is the loss refused).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypedDict, cast

import numpy as np
import pyarrow as pa

from scoring.errors import QualityConfigError

FLOAT32_EXACT_INT = 2**24
FLOAT64_EXACT_INT = 2**53
FLOAT32_MAX = float(np.finfo(np.float32).max)
PROBABILITY_MARKERS = ("probability", "proba", "prob_", "_prob", "score_p")
Target = Literal["float32", "float64"]


def target_dtype(mlflow_type: str | None) -> Target:
    """The dtype the engine feeds the model for a signature column type."""
    return "float64" if mlflow_type == "double" else "float32"


def always_castable(kind: pa.DataType, target: Target) -> bool:
    """True when every value of ``kind`` converts to ``target`` exactly, whatever its range."""
    if pa.types.is_boolean(kind):
        return True
    if pa.types.is_floating(kind):
        return target == "float64" or kind.bit_width <= 32
    if pa.types.is_integer(kind):
        return kind.bit_width <= (16 if target == "float32" else 32)
    return False


def range_limit(kind: pa.DataType, target: Target) -> float | None:
    """The largest magnitude of ``kind`` that ``target`` holds without loss; None: not numeric."""
    if pa.types.is_integer(kind):
        return float(FLOAT32_EXACT_INT if target == "float32" else FLOAT64_EXACT_INT)
    if pa.types.is_floating(kind):
        return FLOAT32_MAX
    return None


def within_limit(low: float | None, high: float | None, limit: float) -> bool:
    """Whether a column's [low, high] (from statistics) lies within ±limit; unknown → False."""
    if low is None or high is None:
        return False
    return -limit <= float(low) and float(high) <= limit


def null_rate(null_count: int, rows: int) -> float:
    """Share of null values; an empty file has none."""
    return null_count / rows if rows else 0.0


def looks_like_probability(name: str) -> bool:
    """Rule for the default [0, 1] expectation: the output's name says it is a probability."""
    lowered = name.lower()
    return any(marker in lowered for marker in PROBABILITY_MARKERS)


Label = str | int | float | bool  # a class label, as YAML reads it


class OutputSection(TypedDict, total=False):
    min: float
    max: float
    values: list[Label]


class DriftSection(TypedDict, total=False):  # DriftRules' fields, each optional
    enabled: bool
    metric: Literal["psi", "ks"]
    max_distance: float
    moved_delta: float
    max_moved_share: float
    sample_rows: int


class NamespaceSection(TypedDict, total=False):
    drift: DriftSection
    outputs: dict[str, OutputSection]


class QualityConfig(TypedDict, total=False):
    """The quality config file's shape (``namespace_quality`` draws it)."""

    namespaces: dict[str, NamespaceSection]


@dataclass(frozen=True)
class OutputRules:
    """What one output must satisfy; not null and finite always hold."""

    min_value: float | None = None
    max_value: float | None = None
    values: tuple[Label, ...] | None = None  # class labels: the known set


@dataclass(frozen=True)
class DriftRules:
    """Drift gate thresholds: a run fails when any output exceeds one."""

    enabled: bool = True
    metric: Literal["psi", "ks"] = "ks"
    max_distance: float = 0.5
    moved_delta: float = 0.5
    max_moved_share: float = 0.25
    sample_rows: int = 200_000


@dataclass(frozen=True)
class NamespaceQuality:
    outputs: dict[str, OutputRules] = field(default_factory=dict)
    drift: DriftRules = field(default_factory=DriftRules)


def default_output_rules(outputs: Sequence[str]) -> dict[str, OutputRules]:
    """Defaults from the outputs: probabilities (by name) lie within [0, 1]."""
    return {
        name: OutputRules(0.0, 1.0) if looks_like_probability(name) else OutputRules()
        for name in outputs
    }


def namespace_quality(
    namespace: str, outputs: Sequence[str], drift: DriftRules, config: QualityConfig | None
) -> NamespaceQuality:
    """Defaults, overlaid by the config's ``namespaces.<namespace>`` section.

    Config shape (YAML or JSON)::

        namespaces:
          churn:
            drift: {metric: ks, max_distance: 0.1, moved_delta: 0.1, max_moved_share: 0.2}
            outputs:
              churn_probability: {min: 0, max: 1}
              segment: {values: [a, b, c]}
    """
    section = ((config or {}).get("namespaces") or {}).get(namespace) or {}
    rules = default_output_rules(outputs)
    for name, given in (section.get("outputs") or {}).items():
        base = rules.get(name, OutputRules())
        rules[name] = OutputRules(
            min_value=given.get("min", base.min_value),
            max_value=given.get("max", base.max_value),
            values=tuple(given["values"]) if given.get("values") is not None else base.values,
        )
    drift_given = section.get("drift") or {}
    unknown = set(drift_given) - set(DriftRules.__dataclass_fields__)
    if unknown:
        raise QualityConfigError(
            f"Quality config for namespace '{namespace}' has unknown drift keys {sorted(unknown)}",
            expected=f"keys among {sorted(DriftRules.__dataclass_fields__)}",
        )
    if drift_given.get("metric", drift.metric) not in ("psi", "ks"):
        raise QualityConfigError(
            f"Quality config for namespace '{namespace}' has drift metric "
            f"{drift_given.get('metric')!r}",
            expected="psi or ks",
        )
    return NamespaceQuality(outputs=rules, drift=replace(drift, **drift_given))


def load_quality_config(path: str | Path | None) -> QualityConfig | None:
    """Read the quality config (YAML, JSON being YAML too); None: no file configured."""
    if not path:
        return None
    import yaml

    source = Path(path).expanduser()
    try:
        loaded = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise QualityConfigError(
            f"Quality config {source} cannot be read",
            expected="a YAML or JSON file with a 'namespaces' mapping",
            found=str(exc),
            fix="Fix the file or BATCHSCORE_QUALITY_CONFIG",
        ) from exc
    if not isinstance(loaded, dict):
        raise QualityConfigError(
            f"Quality config {source} is not a mapping",
            expected="a 'namespaces' mapping",
            found=json.dumps(loaded, default=str)[:200],
        )
    return cast(QualityConfig, loaded)  # its sections are checked as they are read
