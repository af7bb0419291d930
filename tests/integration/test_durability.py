"""Issue 16 item 16: a part damaged on disk (a power loss, a full disk) is rescored, not fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchscore.core.settings import RunSettings, load_settings
from jobs import steps
from jobs.manifest import load_manifest
from jobs.pipeline import run_pipeline
from tests.conftest import KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_truncated_part_is_set_aside_and_only_its_shard_rescored(
    env: dict[str, str], dataset: Path
) -> None:
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace="durable",
    )
    first = run_pipeline(settings, params)
    assert first.published
    damaged = Path(first.shards[2].part)
    whole = damaged.read_bytes()
    kept = {s.part: Path(s.part).stat().st_mtime_ns for s in first.shards if s.part != str(damaged)}
    with open(damaged, "r+b") as part:  # what a power loss leaves of an unsynced file
        part.truncate(len(whole) // 2)

    again = run_pipeline(settings, params)  # the same run: nothing forced
    assert again.run_id == first.run_id
    assert again.steps["score"]["shards_scored"] == 1
    assert again.steps["score"]["shards_skipped"] == len(first.shards) - 1
    assert pq.read_metadata(damaged).num_rows == first.shards[2].rows
    assert {p: Path(p).stat().st_mtime_ns for p in kept} == kept
    aside = list((damaged.parent / ".damaged").iterdir())
    assert [p.name.split(".")[0] for p in aside] == [damaged.name.split(".")[0]]
    assert os.path.getsize(aside[0]) == len(whole) // 2  # kept for inspection
    assert load_manifest(first.run_dir).steps["validate"]["success"] is True
