"""Run folders on an object store after they were written: found by the DAG's callbacks,
collected after a publish, and updated by a canary's promotion or abort.

Against a real S3-compatible server (moto's server mode, ``tests.s3``) that checks every
request's signature, reached through the standard AWS variables only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from batchscore.core import storage
from batchscore.core.settings import RunSettings, load_settings
from batchscore.testing import wait_until
from jobs import canary, steps
from jobs.errors import RunError
from jobs.flow import start_run
from jobs.manifest import Manifest, StoreRecord, load_manifest, safe_run_id
from jobs.pipeline import run_pipeline
from jobs.publishing import collect_run_folders, publish
from kv_export.store import open_store
from tests.conftest import KEY
from tests.integration.test_object_store import BUCKET, Store, aws, s3  # noqa: F401  (fixtures)

PREFIX = "kept-runs"
RUNS = f"s3://{BUCKET}/{PREFIX}"
D1, D2, D3 = "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00", "2026-11-03T00:00:00+00:00"


def keys_under(store: Store, prefix: str) -> list[str]:
    """Every object key under ``prefix`` of the bucket (folder markers left out)."""
    client = store.server.client(key=store.admin)
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return found


def put(store: Store, key: str, body: bytes = b"left over") -> None:
    store.server.client(key=store.admin).put_object(Bucket=BUCKET, Key=key, Body=body)


def dated_run(
    settings: RunSettings, dataset: Path, namespace: str, day: str, **given: Any
) -> Manifest:
    """The whole pipeline in this process, as a DAG named after the namespace runs it for
    the logical date ``day``."""
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace=namespace,
        data_as_of=day,
        **given,
    )
    return run_pipeline(settings, params, run_id=dag_run_id(namespace, day))


def dag_run_id(dag_id: str, day: str) -> str:
    """The run id of the DAG's run for ``day`` (``batchscore_dags.runs.run_key``; the
    test of the DAG's lookup checks that the two agree)."""
    return safe_run_id(f"{dag_id}__{day}")


@pytest.fixture
def dag_runs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``batchscore_dags.runs`` imported as Airflow imports it: from the DAGs folder."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "dags"))
    from batchscore_dags import runs

    return runs


@pytest.fixture
def on_s3(aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:  # noqa: F811
    """The run's environment with its run folders on the store (``BATCHSCORE_OUTPUT_DIR``)."""
    monkeypatch.setenv("BATCHSCORE_OUTPUT_DIR", RUNS)
    return aws | {"BATCHSCORE_OUTPUT_DIR": RUNS}


@pytest.mark.s3
def test_the_dag_finds_a_run_folder_on_the_store_and_its_step(
    s3: Store,  # noqa: F811
    dag_runs: ModuleType,
    on_s3: dict[str, str],
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(RunSettings)
    key = dag_runs.run_key("finder", "manual__1", D1, None)
    assert dag_runs.find_run_dir(settings.runs_location, key) is None
    assert dag_runs.current_step(None) == ("resolve", [])
    params = steps.make_params(
        settings, input_path=str(dataset), model_uri="models:/churn/1", key_column=KEY,
        namespace="finder",
    )  # fmt: skip
    started = start_run(settings, params, run_id=key)["run_dir"]
    assert started == f"{RUNS}/finder/{safe_run_id(key)}"
    assert dag_runs.find_run_dir(settings.runs_location, key) == started
    assert dag_runs.current_step(dag_runs.find_run_dir(settings.runs_location, key)) == (
        "plan",
        ["resolve"],
    )
    # The DAG's deadline callback names the run folder on the store and its step.
    from batchscore_dags import callbacks

    context = {
        "dag_run": {"dag_id": "finder", "dag_run_id": "manual__1", "logical_date": D1},
        "deadline": {"id": "d1", "deadline_time": "2026-11-01T02:00:00Z"},
    }
    with caplog.at_level(logging.WARNING, logger="batchscore.dag"):
        callbacks.deadline_missed(context, job="finder")
    [late] = [r.getMessage() for r in caplog.records if r.name == "batchscore.dag"]
    assert "while it is in step 'plan' (steps done: resolve" in late and started in late, late

    # Another date's folder whose manifest is gone (a collection cut short) is no run.
    other = dag_runs.run_key("finder", "manual__2", D2, None)
    put(s3, f"{PREFIX}/elsewhere/{safe_run_id(other)}/parts/part-00000.parquet")
    assert dag_runs.find_run_dir(settings.runs_location, other) is None

    # Under a local root, as before: a path.
    monkeypatch.setenv("BATCHSCORE_OUTPUT_DIR", str(tmp_path / "runs"))
    local = load_settings(RunSettings)
    here = start_run(local, params, run_id=key)["run_dir"]
    assert here == str(tmp_path / "runs" / "finder" / safe_run_id(key))
    assert dag_runs.find_run_dir(local.runs_dir, key) == here
    assert dag_runs.current_step(dag_runs.find_run_dir(local.runs_dir, key)) == (
        "plan",
        ["resolve"],
    )


@pytest.mark.s3
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.redis
def test_a_publish_collects_the_run_folders_nothing_needs_from_the_store(
    s3: Store,  # noqa: F811
    dag_runs: ModuleType,
    on_s3: dict[str, str],
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: Any,
    start_api: Any,
    api_env: dict[str, str],
) -> None:
    """Three daily runs into Redis keeping two versions: the third's publish (keep_run_days
    0) deletes the first's folder, whose version retention dropped, and the leftovers of
    a collection cut short; the kept and live versions' folders, a folder another store
    needs and the folders of runs in flight stay; the API's fallback reads the live parts."""
    ns = "collected"
    settings = load_settings(RunSettings)
    given = {"store_url": redis_server.url, "keep_versions": 2}
    first = dated_run(settings, dataset, ns, D1, **given)
    second = dated_run(settings, dataset, ns, D2, **given)
    assert first.published and second.published
    assert first.run_dir == f"{RUNS}/{ns}/{dag_run_id(ns, D1)}"
    assert (
        dag_runs.find_run_dir(settings.runs_location, dag_runs.run_key(ns, "x", D1, None))
        == first.run_dir
    )
    assert dag_runs.current_step(first.run_dir) == ("finished", list(dag_runs.STEPS))

    # A folder whose manifest records a version in another store: that store's to keep.
    elsewhere = first.model_copy(
        update={
            "run_id": "elsewhere",
            "run_dir": f"{RUNS}/{ns}/elsewhere",
            "stores": {
                "redis://other:6379/0": StoreRecord(store="redis://other:6379/0", version=7)
            },
        }
    )
    elsewhere.save()
    # What a collection cut short after the manifest leaves: no run, deleted by the next one.
    put(s3, f"{PREFIX}/{ns}/cut-short/parts/part-00000.parquet")
    with pytest.raises(RunError, match="has no manifest.json"):
        load_manifest(f"{RUNS}/{ns}/cut-short")
    # A fresh upload of a run in flight, staged under its hidden name: not touched.
    staged = f"{key_of(second.run_dir)}/parts/.part-00001.parquet.{'a' * 32}.tmp"
    put(s3, staged)

    monkeypatch.setenv("BATCHSCORE_KEEP_RUN_DAYS", "0")
    settings = load_settings(RunSettings)
    third = dated_run(settings, dataset, ns, D3, **given)
    assert third.published
    collected = third.steps["publish"]["collected_run_folders"]
    assert sorted(collected) == sorted([first.run_dir, f"{RUNS}/{ns}/cut-short"]), collected
    assert keys_under(s3, key_of(first.run_dir) + "/") == []
    assert keys_under(s3, f"{PREFIX}/{ns}/cut-short/") == []
    for kept in (second, third):  # the kept and the live version's parts
        assert load_manifest(kept.run_dir).published
        assert all(storage.exists(s.part) for s in kept.shards)
    assert load_manifest(elsewhere.run_dir).run_id == "elsewhere"
    assert staged in keys_under(s3, key_of(second.run_dir) + "/")
    store = open_store(redis_server.url)
    assert sorted(store.state(ns).versions) == [second.version, third.version]

    # Redis goes away: the API answers from the live version's parts on the store.
    api = start_api(api_env | s3.server.env(s3.admin, tmp_path / "api-aws"), redis_server.url)
    sample = [1_000_000, 1_007_777]
    kv = [api.get(f"/v1/predictions/{ns}/{k}").json() for k in sample]
    assert [a["source"] for a in kv] == ["kv", "kv"] and {a["version"] for a in kv} == {
        third.version
    }
    redis_server.stop()

    def from_the_parts() -> bool:
        found = [api.get(f"/v1/predictions/{ns}/{k}") for k in sample]
        return all(a.status_code == 200 and a.json()["source"] == "batch" for a in found)

    wait_until(from_the_parts, seconds=30, what="answers from the batch fallback", interval=0.2)
    answers = [api.get(f"/v1/predictions/{ns}/{k}") for k in sample]
    assert [a.json()["prediction"] for a in answers] == [a["prediction"] for a in kv]


def key_of(location: str) -> str:
    """The object key of an ``s3://BUCKET/...`` URL."""
    return location.removeprefix(f"s3://{BUCKET}/")


@pytest.mark.s3
@pytest.mark.e2e
@pytest.mark.slow
def test_a_collection_deletes_what_killed_uploads_left_in_the_run_folders(
    s3: Store,  # noqa: F811
    on_s3: dict[str, str],
    dataset: Path,
) -> None:
    """Hidden staged objects older than the grace period go from the folders that stay
    (the current run's included); the parts and manifests beside them stay."""
    ns = "staged"
    settings = load_settings(RunSettings)
    run = dated_run(settings, dataset, ns, D1)
    assert run.published
    parts = keys_under(s3, key_of(run.run_dir) + "/parts/")
    left = [
        f"{key_of(run.run_dir)}/.manifest.json.{'b' * 32}.tmp",
        f"{key_of(run.run_dir)}/parts/.part-00000.parquet.{'c' * 32}.tmp",
    ]
    for key in left:
        put(s3, key)
    state = open_store(settings.resolved_store_url).state(ns)
    label = run.store
    # Within the grace period: an upload that may still be copied to its name.
    assert collect_run_folders(run.run_dir, state, label, 7.0) == []
    assert set(left) <= set(keys_under(s3, key_of(run.run_dir) + "/"))
    assert collect_run_folders(run.run_dir, state, label, 7.0, staged_grace_seconds=0) == []
    remaining = keys_under(s3, key_of(run.run_dir) + "/")
    assert not set(left) & set(remaining), remaining
    assert set(parts) <= set(remaining) and f"{key_of(run.run_dir)}/manifest.json" in remaining
    assert load_manifest(run.run_dir).published


@pytest.mark.s3
@pytest.mark.e2e
@pytest.mark.slow
def test_a_canary_promoted_or_aborted_is_recorded_in_its_run_folder_on_the_store(
    s3: Store,  # noqa: F811
    on_s3: dict[str, str],
    dataset: Path,
) -> None:
    ns = "staged_s3"
    settings = load_settings(RunSettings)
    live = dated_run(settings, dataset, ns, D1)
    assert live.published
    candidate = dated_run(settings, dataset, ns, D2, canary_percent=10.0)
    assert candidate.run_dir.startswith(f"{RUNS}/{ns}/")
    assert not candidate.published and candidate.steps["publish"]["canary"] == 10.0

    drift = canary.canary_drift(settings, ns)  # the canary's keys read from its parts
    assert drift["keys"] > 500 and drift["max_abs_diff"] == 0  # the same model and input

    aborted = canary.abort(settings, ns)
    assert (aborted["live"], aborted["canary"]) == (live.version, None)
    record = load_manifest(candidate.run_dir)  # read back from the store
    assert not record.published
    assert record.steps["publish"]["note"] == "canary aborted: not published"
    assert "aborted_at" in record.steps["publish"]

    restarted = publish(candidate.run_dir, settings, canary=5.0)
    assert restarted.get("canary") == 5.0
    promoted = canary.promote(settings, ns)
    assert (promoted["live"], promoted["canary"]) == (candidate.version, None)
    record = load_manifest(candidate.run_dir)
    assert record.published and record.steps["publish"]["note"] == "canary promoted: live"
    assert record.steps["publish"]["canary"] is None
    again = publish(candidate.run_dir, settings)
    assert again.get("newly_published") is False  # published once, by the promotion


def test_a_local_collection_deletes_what_killed_writers_left(tmp_path: Path) -> None:
    """The same rules for run folders on disk: old hidden temporaries go, fresh ones and
    the files beside them stay; a stale folder goes, the current run's never, and one
    whose manifest cannot be read stays for someone to look at."""
    import os

    from kv_export.store import NamespaceState

    namespace = tmp_path / "runs" / "ns"
    current, stale, unreadable = namespace / "run-2", namespace / "run-1", namespace / "run-0"
    for folder in (current, stale, unreadable):
        (folder / "parts").mkdir(parents=True)
    for folder in (current, unreadable):
        (folder / "manifest.json").write_text("{}")
    old_file = current / "parts" / f".part-00000.parquet.{'d' * 32}.tmp"
    fresh_file = current / f".manifest.json.{'e' * 32}.tmp"
    for path in (old_file, fresh_file, current / "parts" / "part-00000.parquet"):
        path.write_bytes(b"x")
    long_ago = time.time() - 2 * 86400
    for path in (old_file, stale, unreadable, unreadable / "manifest.json"):
        os.utime(path, (long_ago, long_ago))
    gone = collect_run_folders(current, NamespaceState(), "lmdb:///elsewhere", 1.0)
    assert gone == [str(stale)] and not stale.exists() and unreadable.exists()
    assert not old_file.exists() and fresh_file.exists()
    assert (current / "parts" / "part-00000.parquet").exists()
    assert (current / "manifest.json").exists()
