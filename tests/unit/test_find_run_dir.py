"""The deadline callback's lookup of a DAG run's folder (``batchscore_dags.runs``): the
key's own run, else its shadow run, never another key that starts with it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(DAGS))
    from batchscore_dags import runs

    yield runs


def make_run(root: Path, namespace: str, run_id: str, written: int) -> str:
    from jobs.manifest import safe_run_id

    folder = root / namespace / safe_run_id(run_id)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    os.utime(folder / "manifest.json", (written, written))
    return str(folder)


def test_the_keys_own_run_comes_before_its_shadow_and_a_longer_key_is_another_run(
    runs: ModuleType, tmp_path: Path
) -> None:
    key = runs.run_key("score_churn", "manual__1", None, None)
    assert runs.find_run_dir(tmp_path, key) is None
    longer = make_run(tmp_path, "churn", runs.run_key("score_churn", "manual__10", None, None), 3)
    assert runs.find_run_dir(tmp_path, key) is None  # manual__10 is not manual__1
    shadow = make_run(tmp_path, "churn", runs.run_key("score_churn", "manual__1", None, "ch"), 2)
    assert runs.find_run_dir(tmp_path, key) == shadow  # a DAG run that scored a shadow
    own = make_run(tmp_path, "churn", key, 1)
    assert runs.find_run_dir(tmp_path, key) == own  # though its shadow was written later
    assert runs.find_run_dir(tmp_path, runs.run_key("score_churn", "manual__10", None, None)) == (
        longer
    )


def test_the_manifest_written_last_wins_across_namespaces(runs: ModuleType, tmp_path: Path) -> None:
    key = runs.run_key("score_churn", "scheduled__x", "2026-11-20T00:00:00+00:00", None)
    make_run(tmp_path, "old_namespace", key, 1)
    newer = make_run(tmp_path, "churn", key, 2)
    assert runs.find_run_dir(tmp_path, key) == newer
