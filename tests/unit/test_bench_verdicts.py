"""make bench-score's verdicts: each target decided on the measured ratio, and shown with
enough digits that a ratio just short of its target does not read as the target."""

from __future__ import annotations

from bench.default_path_bench import verdicts

ROWS = 2_000_000


def results(score: float, limit: float) -> dict[str, object]:
    return {
        "sizes": [ROWS],
        "limits": {ROWS: ROWS / limit},  # rows/s
        "best": {
            f"cli-{ROWS}": {
                "wall": 7.0,
                "steps": {"score": score, "validate": 0.05},
                "docs_waited_seconds": 0.0,
            },
            f"loop-{ROWS}": {"wall": 8.5, "work": 6.8},
            f"nochecks-{ROWS}": {"wall": 7.0, "steps": {"score": score - 0.01}},
            f"dag-{ROWS}": {"wall": 12.0},
            f"cli-beside-dag-{ROWS}": {"wall": 7.0},
        },
    }


def test_a_ratio_just_short_of_its_target_is_shown_short_of_it() -> None:
    lines = verdicts(results(score=2.3788, limit=2.0153)).splitlines()
    assert "- score step ≥ 0.85× the serial limit at 2,000,000 rows (0.847×): NOT met" in lines
    assert "- DAG ≤ 2× the CLI run at 2,000,000 rows (1.714×): met" in lines
    assert "- whole run ≤ 1.5× the plain loop process at 2,000,000 rows (0.824×): met" in lines


def test_a_ratio_at_its_target_meets_it() -> None:
    lines = verdicts(results(score=2.0, limit=1.7)).splitlines()
    assert "- score step ≥ 0.85× the serial limit at 2,000,000 rows (0.850×): met" in lines
