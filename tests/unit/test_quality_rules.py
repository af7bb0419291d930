"""Pure quality rules: drift distances, moved share, castability, per-namespace config."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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
from scoring.validation import (
    PartChecks,
    PartReport,
    duplicate_keys,
    import_gx,
    merge_results,
    overlapping_groups,
)
from scoring.validation import suite as part_suites
from scoring.validation.report import _outcome as outcome_of
from scoring.validation.suite import _document as document_of
from scoring.validation.suite import _part_suite as part_suite

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


# --- validation across parts: key uniqueness by merging sorted parts, summed results ------


def _sorted_part(folder: Path, shard: int, keys: list[Any], row_group: int = 3) -> PartReport:
    """A sorted part on disk and the result its worker would have stored for it."""
    ordered = sorted(keys)
    path = folder / f"part-{shard:05d}.parquet"
    pq.write_table(pa.table({"k": ordered}), path, row_group_size=row_group)
    counts = Counter(ordered)
    repeated = [k for k in ordered if counts[k] > 1]
    unique = {
        "success": not repeated,
        "expectation_config": {
            "type": "expect_column_values_to_be_unique",
            "kwargs": {"column": "k"},
        },
        "result": {"unexpected_count": len(repeated), "partial_unexpected_list": repeated[:20]},
    }
    return PartReport(
        shard_id=shard, part=str(path), expected_rows=len(keys), rows=len(keys),
        success=not repeated, seconds=0.0,
        min_key=ordered[0] if ordered else None, max_key=ordered[-1] if ordered else None,
        fingerprint="", part_size=0, part_mtime_ns=0, checked_by="", results=[unique],
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["int", "string"])
def test_duplicate_keys_across_parts_match_a_full_count(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        folder = tmp_path / f"{kind}-{trial}"
        folder.mkdir()
        drawn = [
            rng.integers(0, int(rng.integers(10, 300)), int(rng.integers(0, 40))).tolist()
            for _ in range(int(rng.integers(1, 6)))
        ]
        keys = [[f"key-{k:04d}" for k in p] if kind == "string" else p for p in drawn]
        reports = [
            _sorted_part(folder, i, p, row_group=int(rng.integers(1, 8)))
            for i, p in enumerate(keys)
        ]
        everywhere = Counter(k for p in keys for k in p)
        found = duplicate_keys(reports, "k")
        assert found.rows == sum(n for n in everywhere.values() if n > 1)
        assert found.parts == {
            r.name: n
            for r, p in zip(reports, keys, strict=True)
            if (n := sum(everywhere[k] > 1 for k in p))
        }
        assert set(found.sample) <= {k for k, n in everywhere.items() if n > 1}


def test_parts_with_disjoint_key_ranges_are_not_read(tmp_path: Path) -> None:
    reports = [_sorted_part(tmp_path, i, list(range(100 * i, 100 * i + 50))) for i in range(4)]
    reports.append(_sorted_part(tmp_path, 4, [7, 7, 8]))  # overlaps part 0; repeats its own key 7
    for report in reports[1:4]:
        Path(report.part).unlink()  # a disjoint part's own result is all the check needs
    found = duplicate_keys(reports, "k")
    assert [len(g) for g in overlapping_groups(reports)] == [2, 1, 1, 1]
    assert found.parts_merged == 2
    assert (found.rows, found.parts) == (5, {"part-00000.parquet": 2, "part-00004.parquet": 3})
    assert found.sample == [7, 8]


def _not_null(column: str, elements: int, unexpected: int) -> dict[str, Any]:
    counts = [{"value": None, "count": unexpected}] if unexpected else []
    return {
        "success": unexpected == 0,
        "expectation_config": {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": column},
        },
        "result": {
            "element_count": elements,
            "unexpected_count": unexpected,
            "partial_unexpected_list": [None] * min(unexpected, 20),
            "partial_unexpected_counts": counts,
        },
        "exception_info": {"raised_exception": False},
    }


def test_per_part_results_are_summed_and_the_failing_part_named(tmp_path: Path) -> None:
    first, second = (
        _sorted_part(tmp_path, 0, list(range(10))),
        _sorted_part(tmp_path, 1, list(range(10, 20))),
    )
    first = replace(first, results=first.results + [_not_null("p", 10, 0)])
    second = replace(second, rows=9, results=second.results + [_not_null("p", 9, 4)])
    merged = merge_results([first, second], "k", 20, duplicate_keys([first, second], "k"))
    outcomes = {o.expectation: o for o in map(outcome_of, merged)}
    rows = outcomes["expect_table_row_count_to_equal"]
    assert not rows.success and (rows.observed, rows.expected) == (19, 20)
    assert rows.parts == {"part-00001.parquet": "9 rows, its shard has 10"}
    assert rows.describe() == (
        "expect_table_row_count_to_equal across all parts (observed 19, expected 20) "
        "in part-00001.parquet (9 rows, its shard has 10)"
    )
    nulls = outcomes["expect_column_values_to_not_be_null"]
    assert not nulls.success and nulls.unexpected_count == 4 and nulls.scope == "each part"
    assert nulls.describe() == (
        "expect_column_values_to_not_be_null on column 'p' (4 unexpected values, "
        "e.g. [None, None, None, None]) in part-00001.parquet (4 unexpected)"
    )
    summed = next(d for d in merged if d["expectation_config"]["kwargs"].get("column") == "p")
    assert summed["result"]["element_count"] == 19
    assert summed["result"]["partial_unexpected_counts"] == [{"value": None, "count": 4}]
    assert outcomes["expect_column_values_to_be_unique"].success


def test_part_checks_default_unnamed_outputs_and_fingerprint_the_suite() -> None:
    checks = PartChecks("k", {"revenue": OutputRules(min_value=0)}, "/tmp/v")
    assert checks.rules_for(["revenue", "p_proba", "prediction"]) == {
        "revenue": OutputRules(min_value=0),
        "p_proba": OutputRules(0.0, 1.0),
        "prediction": OutputRules(),
    }
    other = PartChecks("k", {"revenue": OutputRules(min_value=1)}, "/tmp/v")
    assert checks.fingerprint != other.fingerprint
    assert checks.fingerprint == PartChecks("k", dict(checks.rules), "/elsewhere").fingerprint
    assert checks.result_path("/runs/r/parts/part-00003.parquet") == "/tmp/v/part-00003.json"


def test_an_expectation_gx_could_not_evaluate_fails_and_says_why(tmp_path: Path) -> None:
    part = _sorted_part(tmp_path, 0, [1, 2, 3])
    broken = _not_null("p", 3, 0) | {
        "success": False,
        "result": {},
        "exception_info": {
            "raised_exception": True,
            "exception_message": 'Error: The column "p" in BatchData does not exist.',
            "exception_traceback": "…",
        },
    }
    merged = merge_results(
        [replace(part, results=[*part.results, broken])], "k", 3, duplicate_keys([part], "k")
    )
    (failed,) = [o for o in map(outcome_of, merged) if not o.success]
    assert failed.parts == {"part-00000.parquet": "GX raised"}
    assert failed.describe() == (
        "expect_column_values_to_not_be_null on column 'p' (GX raised: Error: The column \"p\" "
        "in BatchData does not exist.) in part-00000.parquet (GX raised)"
    )


def test_a_passing_part_costs_basic_yet_stores_what_summary_would() -> None:
    """The suite runs BASIC first; its documents must equal SUMMARY's, failing or not."""
    checks = PartChecks("k", {}, "/tmp/unused")
    suite = part_suite(checks, ("p_proba",))
    keys = np.arange(1000, dtype=np.int64)
    for values, passes in [(RNG.uniform(0, 1, 1000), True), (np.full(1000, 1.5), False)]:
        frame = pa.table({"k": keys, "p_proba": values}).to_pandas()
        stored = suite.run(frame, 1000)
        summary = suite._run(frame, 1000, "SUMMARY")
        assert stored["success"] is passes is summary.success
        assert stored["results"] == [document_of(r) for r in summary.results]
    counts = [r["result"].get("partial_unexpected_counts") for r in stored["results"]]
    assert {"value": 1.5, "count": 20} in counts[-1]  # a failing part keeps its value counts


def test_a_process_keeps_a_bounded_number_of_suites(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived worker checks parts for many namespaces: the least recently used suites
    are dropped, the ones in use are kept and reused."""
    monkeypatch.setattr(part_suites, "KEPT_SUITES", 2)
    monkeypatch.setattr(part_suites, "_suites", {})
    first = part_suite(PartChecks("k", {}, "/tmp/unused"), ("a",))
    part_suite(PartChecks("k", {}, "/tmp/unused"), ("b",))
    assert part_suite(PartChecks("k", {}, "/tmp/other"), ("a",)) is first  # same suite
    part_suite(PartChecks("k", {}, "/tmp/unused"), ("c",))  # drops b, the least recent
    assert [outputs for _, outputs in part_suites._suites] == [("a",), ("c",)]


# Run in a fresh interpreter, so that GX is imported there for the first time.
FRESH_GX_IMPORT = """
import gc, json, sys

class Watch:  # a finder that only looks: is the collector on as GX's import starts?
    seen = []

    def find_spec(self, name, path=None, target=None):
        if name == "great_expectations":
            self.seen.append(gc.isenabled())
        return None

from scoring.validation.gx import import_gx

def importing_gx():  # GX's module exists and its code is still running
    module = sys.modules.get("great_expectations")
    return module is not None and getattr(module.__spec__, "_initializing", False)

fresh = "great_expectations" not in sys.modules
collections, during = [], []
def seen(phase, info):
    if phase == "start":
        (during if importing_gx() else collections).append(info["generation"])

gc.callbacks.append(seen)
junk = [[] for _ in range(100_000)]  # allocations that trigger automatic collections
sys.meta_path.insert(0, Watch())
import_gx()
print(json.dumps({"fresh": fresh, "noticed": len(collections), "during": during,
                  "on_at_import": Watch.seen, "on_after": gc.isenabled()}))
"""


def test_gx_is_imported_with_the_garbage_collector_paused() -> None:
    """No collection runs while GX is imported (they walked every object loaded so far),
    and the collector is on again after."""
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_GX_IMPORT], capture_output=True, text=True, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["fresh"] and seen["noticed"] > 0  # the callback does see collections
    assert seen["on_at_import"] == [False]
    assert seen["during"] == []
    assert seen["on_after"] is True


def test_importing_gx_leaves_the_garbage_collector_off_for_a_caller_that_turned_it_off() -> None:
    gc.disable()
    try:
        assert import_gx().__name__ == "great_expectations"
        assert not gc.isenabled()
    finally:
        gc.enable()
