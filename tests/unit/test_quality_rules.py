"""Pure quality rules: drift distances, moved share, castability, per-namespace config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from scoring.drift import judge, ks, moved_share, psi
from scoring.errors import QualityConfigError
from scoring.quality import (
    DriftRules,
    OutputRules,
    always_castable,
    load_quality_config,
    looks_like_probability,
    namespace_quality,
    null_rate,
    range_limit,
    target_dtype,
    within_limit,
)

RNG = np.random.default_rng(0)
BASE = RNG.uniform(0, 1, 20_000)


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    assert psi(BASE, BASE) == pytest.approx(0.0, abs=1e-9)
    assert psi(BASE, RNG.uniform(0, 1, 20_000)) < 0.01
    assert psi(BASE, np.clip(BASE + 0.5, 0, 1)) > 1.0


def test_psi_ignores_non_finite_values_and_handles_a_constant_live_output() -> None:
    assert psi(np.append(BASE, np.nan), BASE) == pytest.approx(0.0, abs=1e-9)
    constant = np.full(1000, 0.5)
    assert psi(constant, constant) == pytest.approx(0.0, abs=1e-9)
    assert psi(constant, constant + 0.3) > 1.0


def test_ks_is_the_largest_cdf_gap() -> None:
    assert ks(BASE, BASE) == 0.0
    assert ks(np.zeros(100), np.ones(100)) == 1.0
    assert ks(BASE, BASE + 0.1) == pytest.approx(0.1, abs=0.02)


def test_moved_share_counts_keys_moved_by_more_than_delta() -> None:
    before = np.array([0.1, 0.2, 0.3, 0.4])
    after = np.array([0.1, 0.5, 0.3, 0.0])
    assert moved_share(before, after, 0.25) == 0.5
    assert moved_share(before, after, 0.35) == 0.25
    assert moved_share(np.empty(0), np.empty(0), 0.1) == 0.0


def test_judge_flags_distance_or_moved_share_and_describes_it() -> None:
    rules = DriftRules(metric="psi", max_distance=0.2, moved_delta=0.1, max_moved_share=0.1)
    calm = judge("p", BASE, BASE, BASE, BASE + 0.01, rules)
    assert not calm.drifted
    shifted = judge("p", BASE, np.clip(BASE + 0.5, 0, 1), BASE, BASE + 0.5, rules)
    assert shifted.drifted and shifted.moved_share == 1.0
    text = shifted.describe()
    assert "output 'p'" in text and "PSI" in text and "100.0%" in text and "max 0.2" in text
    # Same distribution, every key permuted: only the moved share catches it.
    swapped = judge("p", BASE, BASE, BASE, BASE[::-1], rules)
    assert swapped.distance < 0.01 and swapped.drifted


@pytest.mark.parametrize(
    ("kind", "target", "always"),
    [
        (pa.float32(), "float32", True),
        (pa.float16(), "float32", True),
        (pa.bool_(), "float32", True),
        (pa.int16(), "float32", True),
        (pa.uint8(), "float32", True),
        (pa.int32(), "float32", False),
        (pa.int64(), "float32", False),
        (pa.float64(), "float32", False),
        (pa.float64(), "float64", True),
        (pa.int32(), "float64", True),
        (pa.int64(), "float64", False),
    ],
)
def test_castability_by_type(kind: pa.DataType, target: str, always: bool) -> None:
    assert always_castable(kind, target) is always  # type: ignore[arg-type]


def test_castability_by_range() -> None:
    int_limit = range_limit(pa.int64(), "float32")
    assert int_limit == 2**24
    assert within_limit(-(2**24), 2**24, int_limit)
    assert not within_limit(0, 2**24 + 1, int_limit)  # 16,777,217 has no float32
    assert range_limit(pa.int64(), "float64") == 2**53
    float_limit = range_limit(pa.float64(), "float32")
    assert within_limit(-1e38, 3e38, float_limit)
    assert not within_limit(0, 1e39, float_limit)  # would become inf
    assert not within_limit(None, None, float_limit)  # no statistics: not provable
    assert range_limit(pa.string(), "float32") is None


def test_target_dtype_follows_the_signature_type() -> None:
    assert target_dtype("double") == "float64"
    assert target_dtype("float") == target_dtype("long") == target_dtype(None) == "float32"


def test_null_rate() -> None:
    assert null_rate(5, 100) == 0.05 and null_rate(0, 0) == 0.0


def test_default_expectations_treat_probability_outputs_as_within_0_and_1() -> None:
    assert looks_like_probability("churn_probability") and looks_like_probability("p_proba")
    assert not looks_like_probability("revenue")
    quality = namespace_quality("churn", ["churn_probability", "revenue"], DriftRules(), None)
    assert quality.outputs["churn_probability"] == OutputRules(0.0, 1.0)
    assert quality.outputs["revenue"] == OutputRules()
    assert quality.drift == DriftRules()


def test_namespace_config_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "quality.yaml"
    path.write_text(
        "namespaces:\n"
        "  churn:\n"
        "    drift: {metric: ks, max_distance: 0.05}\n"
        "    outputs:\n"
        "      revenue: {min: 0}\n"
        "      label: {values: [a, b]}\n"
        "  other:\n"
        "    drift: {enabled: false}\n"
    )
    config = load_quality_config(path)
    quality = namespace_quality("churn", ["churn_probability", "revenue"], DriftRules(), config)
    assert quality.drift.metric == "ks" and quality.drift.max_distance == 0.05
    assert quality.drift.moved_delta == DriftRules().moved_delta  # the rest: defaults
    assert quality.outputs["revenue"] == OutputRules(min_value=0)
    assert quality.outputs["label"].values == ("a", "b")
    assert quality.outputs["churn_probability"] == OutputRules(0.0, 1.0)
    assert not namespace_quality("other", [], DriftRules(), config).drift.enabled
    assert namespace_quality("third", [], DriftRules(), config).drift == DriftRules()


def test_bad_config_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("namespaces:\n  churn:\n    drift: {max_psi: 0.1}\n")
    with pytest.raises(QualityConfigError, match="unknown drift keys \\['max_psi'\\]"):
        namespace_quality("churn", [], DriftRules(), load_quality_config(path))
    with pytest.raises(QualityConfigError, match="cannot be read"):
        load_quality_config(tmp_path / "missing.yaml")
    assert load_quality_config(None) is None


def test_distribution_plot_is_a_png(tmp_path: Path) -> None:
    from scoring.reports import plot_distributions

    path = plot_distributions(
        {"p": BASE}, {"p": np.clip(BASE + 0.2, 0, 1)}, tmp_path / "r" / "d.png", "t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = plot_distributions({"p": BASE}, {}, tmp_path / "first.png", "first publish")
    assert first.exists()


def _part(path: Path, keys: list, values: list[float]) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"k": keys, "p": pa.array(values, pa.float32())}), path)
    return path


def test_samples_join_on_the_key_and_survive_a_first_publish(tmp_path: Path) -> None:
    from scoring.drift import read_samples

    live = _part(tmp_path / "live.parquet", [1, 2, 3], [0.1, 0.2, 0.3])
    new = _part(tmp_path / "new.parquet", [2, 3, 4], [0.2, 0.9, 0.4])
    samples = read_samples([live], [new], "k", "k", ["p"], sample_rows=100)
    pairs = np.array(sorted(zip(samples.live_joined["p"], samples.new_joined["p"], strict=True)))
    np.testing.assert_allclose(pairs, [[0.2, 0.2], [0.3, 0.9]], rtol=1e-6)
    assert len(samples.live["p"]) == 3 and len(samples.new["p"]) == 3

    text = _part(tmp_path / "text.parquet", ["2", "3"], [0.2, 0.3])
    mixed = read_samples([live], [text], "k", "k", ["p"], sample_rows=100)
    assert len(mixed.live_joined["p"]) == 2  # int and string keys compare as strings

    first = read_samples([], [text], "k", "k", ["p"], sample_rows=100)
    assert "p" not in first.live and len(first.new["p"]) == 2

    sampled = read_samples([live], [new], "k", "k", ["p"], sample_rows=1)
    assert len(sampled.live["p"]) == 1 and len(sampled.live_joined["p"]) == 1
