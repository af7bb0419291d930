"""`batchscore versions / gc / rollback / step export / step publish` against a real Redis."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import (
    InputRecord,
    Manifest,
    ModelRecord,
    RunParams,
    ShardRecord,
    load_manifest,
)
from kv_export.state import NewVersion
from kv_export.store import open_store
from tests.conftest import RedisServer, run_cli

pytestmark = pytest.mark.redis
ROWS = 3_000


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    return env | {"BATCHSCORE_HOME": str(tmp_path / "home")}


def make_run(folder: Path, run_id: str, value: float, store_url: str) -> Path:
    """A run folder as the validate step leaves it: one validated, scored part."""
    run_dir = folder / run_id
    parts = run_dir / "parts"
    parts.mkdir(parents=True)
    part = parts / "part-00000.parquet"
    keys = np.arange(ROWS, dtype=np.int64)
    pq.write_table(pa.table({"k": keys, "p": np.full(ROWS, value, np.float32)}), part)
    manifest = Manifest(
        run_id=run_id, namespace="ns", run_dir=str(run_dir),
        params=RunParams(input_path="in", model_uri="models:/m/1", key_column="k",
                         namespace="ns", store_url=store_url, batch_size=0, workers=1,
                         shard_rows=ROWS),
        model=ModelRecord(name="m", version="1", uri="models:/m/1", requested="models:/m/1",
                          local_dir=str(run_dir), flavor="pytorch", serialization="pickle",
                          signature_kind="columns", features=["f"], outputs=["p"]),
        input=InputRecord(root="in", fingerprint="x", rows=ROWS, files=1, key_type="int"),
        shards=[ShardRecord(id=0, pieces=[], rows=ROWS, part=str(part), state="done",
                            min_key=0, max_key=ROWS - 1)],
        validation={"success": True},
    )  # fmt: skip
    manifest.record_step("score", seconds=0.0, rows=ROWS)
    manifest.save()
    return run_dir


def test_publish_step_refuses_a_missing_or_incomplete_version(
    tmp_path: Path, redis_server: RedisServer, cli_env: dict[str, str]
) -> None:
    url = redis_server.url
    good = make_run(tmp_path, "run-1", 1.0, url)
    for step in ("export", "publish"):
        done = run_cli("step", step, str(good), env=cli_env)
        assert done.returncode == 0, done.stderr
    bad = make_run(tmp_path, "run-2", 2.0, url)
    store = open_store(url)
    loading = store.begin_version("ns", NewVersion(
        run_id="run-2", expected_keys=ROWS, outputs=["p"], model_name="m", model_version="1",
        scored_at="t", key_column="k",
    ))  # fmt: skip
    manifest = json.loads((bad / "manifest.json").read_text())
    refusals = ((loading.version, "state 'loading'"), (99, "has no version 99"))
    for version, message in refusals:
        manifest["version"] = version
        (bad / "manifest.json").write_text(json.dumps(manifest))
        refused = run_cli("step", "publish", str(bad), env=cli_env)
        assert refused.returncode == 3  # bad input: the version named cannot be published
        assert re.search(message, refused.stderr), refused.stderr
        assert load_manifest(bad).published is False
    state = store.state("ns")
    assert state.live == 1 and state.history == [1]


def test_versions_gc_and_rollback_on_the_command_line(
    tmp_path: Path, redis_server: RedisServer, cli_env: dict[str, str]
) -> None:
    url = redis_server.url
    for i in range(1, 5):
        run_dir = make_run(tmp_path, f"run-{i}", float(i), url)
        for step in ("export", "publish"):
            assert run_cli("step", step, str(run_dir), env=cli_env).returncode == 0
    env = cli_env | {"COLUMNS": "200"}
    listed = run_cli("versions", "ns", "--store", url, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "live 4" in listed.stdout and "● live" in listed.stdout
    assert "kept (rollback)" in listed.stdout
    back = run_cli("rollback", "ns", "--to", "3", "--store", url, env=env)
    assert back.returncode == 0 and "4 → 3" in back.stdout
    collected = run_cli("gc", "ns", "--keep", "1", "--ttl", "3600", "--store", url, env=env)
    assert collected.returncode == 0, collected.stderr
    assert "deleted 4" in collected.stdout and "live version 3" in collected.stdout
    state = json.loads(run_cli("versions", "ns", "--json", "--store", url, env=env).stdout)
    assert list(state["versions"]) == ["3"] and state["ttl_seconds"] == 3600
    assert state["deleting"] == {}
