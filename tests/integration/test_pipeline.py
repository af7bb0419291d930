"""The whole pipeline against real components: MLflow (SQLite), Dask LocalCluster, GX, stores."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchscore.core.settings import RunSettings, load_settings
from batchscore.samples import feature_names
from jobs import steps
from jobs.manifest import load_manifest
from jobs.pipeline import run_pipeline
from kv_export.encoding import unpack_value
from kv_export.store import open_store
from tests.conftest import (
    KEY,
    N_FEATURES,
    RedisServer,
    Registry,
    client_alias,
    direct_forward,
    read_rows,
    run_cli,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SAMPLE = [1_000_000, 1_000_017, 1_005_555, 1_011_999]


def lookup(store_url: str, namespace: str, keys: list[int]) -> tuple[object, list[dict | None]]:
    store = open_store(store_url)
    info = store.state(namespace).live_info()
    assert info is not None
    values = store.get_many(namespace, info, [str(k).encode() for k in keys])
    return info, [unpack_value(v, info.outputs) if v else None for v in values]


def check_run(
    store_url: str, summary: dict, registry: Registry, dataset: Path, model_uri: str
) -> None:
    assert summary["published"] is True and summary["rows"] == 12_000
    info, found = lookup(store_url, summary["namespace"], SAMPLE)
    assert info.run_id == summary["run_id"] and info.model_version == summary["model"]["version"]
    assert info.key_count == 12_000
    rows = read_rows(dataset, SAMPLE)
    expected = direct_forward(registry.tracking_uri, model_uri, np.stack([rows[k] for k in SAMPLE]))
    got = np.array([[v for v in f.values()] for f in found], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cli_run_with_the_embedded_store(
    env: dict[str, str], registry: Registry, dataset: Path, tmp_path: Path
) -> None:
    summary_path = tmp_path / "summary.json"
    done = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        "models:/churn@champion",
        "--key-column",
        KEY,
        "--summary-json",
        str(summary_path),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(summary_path.read_text())
    assert set(summary) >= {"run_id", "namespace", "model", "rows", "version", "published", "steps"}
    assert summary["namespace"] == "churn"
    assert summary["model"] == {"name": "churn", "version": "1", "serialization": "pickle"}
    assert set(summary["steps"]) >= {"score", "validate", "export", "publish"}
    assert summary["steps"]["score"]["rows"] == 12_000
    store_url = load_settings(RunSettings).resolved_store_url
    check_run(store_url, summary, registry, dataset, "models:/churn/1")

    manifest = load_manifest(summary["run_dir"])
    # 6 shards, 2 at once on the in-process worker (the default, local), one model load.
    assert len(manifest.shards) == 6
    loads = manifest.steps["score"]["model_loads_per_worker"]
    (worker,) = loads  # host:pid of the `batchscore run` process itself
    assert worker.startswith(f"{socket.gethostname()}:") and loads[worker] == 1
    # Each part is sorted by key and records the model version and run id.
    for shard in manifest.shards:
        part = pq.ParquetFile(shard.part)
        meta = part.schema_arrow.metadata
        assert meta[b"batchscore.model_version"] == b"1"
        assert meta[b"batchscore.run_id"] == summary["run_id"].encode()
        keys = part.read(columns=[KEY]).column(KEY).to_pylist()
        assert keys == sorted(keys)
    assert sum(s.rows for s in manifest.shards) == 12_000

    status = run_cli("status", "churn", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (
        report["live"] == summary["version"] and report["last_run"]["run_id"] == summary["run_id"]
    )


@pytest.mark.redis
def test_cli_run_with_redis(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    summary_path = tmp_path / "summary.json"
    done = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        "models:/churn/2",
        "--key-column",
        KEY,
        "--store",
        redis_server.url,
        "--namespace",
        "churn_redis",
        "--summary-json",
        str(summary_path),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(summary_path.read_text())
    check_run(redis_server.url, summary, registry, dataset, "models:/churn/2")


def test_pt2_model_scores_with_named_features(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    settings = load_settings(RunSettings)
    features = feature_names(N_FEATURES)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn_pt2@champion",
        key_column=KEY,
        features=features,
    )
    manifest = run_pipeline(settings, params)
    assert manifest.model.serialization == "pt2" and manifest.published
    check_run(
        settings.resolved_store_url, manifest.summary(), registry, dataset, "models:/churn_pt2/1"
    )


def test_tensor_signature_without_features_is_refused(env: dict[str, str], dataset: Path) -> None:
    done = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        "models:/churn_pt2/1",
        "--key-column",
        KEY,
        env=env,
    )
    assert done.returncode == 3  # bad input: an unsupported model
    assert "tensor input signature" in done.stderr and "--features" in done.stderr


def test_the_alias_is_pinned_once_per_run(
    env: dict[str, str], registry: Registry, dataset: Path
) -> None:
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn@champion",
        key_column=KEY,
        namespace="pinned",
    )
    ref = steps.resolve(settings, params, run_id="scheduled__2026-11-23")
    assert ref["model_version"] == "1"
    try:
        client_alias("churn", "2", registry.tracking_uri)  # promoted while the run is under way
        again = steps.resolve(settings, params, run_id="scheduled__2026-11-23")  # a retried task
        assert again["model_version"] == "1"
        for step in (steps.plan, steps.score, steps.validate, steps.export, steps.publish):
            step(ref["run_dir"])
    finally:
        client_alias("churn", "1", registry.tracking_uri)
    manifest = load_manifest(ref["run_dir"])
    check_run(settings.resolved_store_url, manifest.summary(), registry, dataset, "models:/churn/1")


def test_a_rerun_scores_only_missing_shards_and_publishes_once(
    env: dict[str, str], dataset: Path
) -> None:
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn/1",
        key_column=KEY,
        namespace="rerun",
    )
    ref = steps.resolve(settings, params)
    steps.plan(ref["run_dir"])
    steps.score(ref["run_dir"])
    manifest = load_manifest(ref["run_dir"])
    lost = [Path(manifest.shards[1].part), Path(manifest.shards[4].part)]
    kept = {
        s.part: Path(s.part).stat().st_mtime_ns for s in manifest.shards if Path(s.part) not in lost
    }
    for part in lost:
        part.unlink()  # as if the run had died before these shards finished

    first = run_pipeline(settings, params)  # same inputs, same pin: the same run
    assert first.run_id == ref["run_id"]
    assert first.steps["score"]["shards_scored"] == 2
    assert first.steps["score"]["shards_skipped"] == 4
    assert {p: Path(p).stat().st_mtime_ns for p in kept} == kept
    assert first.published

    second = run_pipeline(settings, params)
    assert second.steps["score"]["shards_scored"] == 0
    assert second.steps["export"]["reused"] is True
    assert second.steps["publish"]["note"] == "already live"
    state = open_store(settings.resolved_store_url).state("rerun")
    assert len(state.versions) == 1 and state.live == first.version


def test_failed_validation_keeps_the_live_version(
    env: dict[str, str], dataset: Path, tmp_path: Path
) -> None:
    good = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        "models:/churn/1",
        "--key-column",
        KEY,
        "--namespace",
        "gated",
        env=env,
    )
    assert good.returncode == 0, good.stderr
    store_url = load_settings(RunSettings).resolved_store_url
    before, values_before = lookup(store_url, "gated", SAMPLE)

    bad = run_cli(
        "run",
        "--input",
        str(dataset),
        "--model",
        "models:/broken@champion",
        "--key-column",
        KEY,
        "--namespace",
        "gated",
        "--summary-json",
        str(tmp_path / "s.json"),
        env=env,
    )
    assert bad.returncode == 4  # a quality gate held the output back
    message = " ".join(bad.stderr.split())
    assert "failed validation" in message
    assert "expect_column_values_to_not_be_null on column 'churn_probability'" in message
    after, values_after = lookup(store_url, "gated", SAMPLE)
    assert after.version == before.version and values_after == values_before
    state = open_store(store_url).state("gated")
    assert len(state.versions) == 1  # nothing of the bad run reached the store
    assert json.loads((tmp_path / "s.json").read_text())["published"] is False


def test_rollback_restores_the_previous_version(env: dict[str, str], dataset: Path) -> None:
    for model in ("models:/churn/1", "models:/churn/2"):
        done = run_cli(
            "run",
            "--input",
            str(dataset),
            "--model",
            model,
            "--key-column",
            KEY,
            "--namespace",
            "rb",
            env=env,
        )
        assert done.returncode == 0, done.stderr
    store_url = load_settings(RunSettings).resolved_store_url
    assert lookup(store_url, "rb", SAMPLE)[0].model_version == "2"
    done = run_cli("rollback", "rb", env=env)
    assert done.returncode == 0, done.stderr
    assert "→ 1" in done.stdout
    assert lookup(store_url, "rb", SAMPLE)[0].model_version == "1"


def test_the_driver_downloads_the_model_once_per_run(
    env: dict[str, str], registry: Registry, dataset: Path, tmp_path: Path
) -> None:
    """Only resolve downloads the pinned model (into the run folder); the workers, the
    later steps and a retried resolve use that copy. Shown by taking the registry's
    artifacts away after resolve: the run still completes."""
    settings = load_settings(RunSettings)
    params = steps.make_params(
        settings,
        input_path=str(dataset),
        model_uri="models:/churn@champion",
        key_column=KEY,
        namespace="downloaded",
    )
    ref = steps.resolve(settings, params, run_id="scheduled__2026-11-24")
    model_dir = Path(load_manifest(ref["run_dir"]).model.local_dir)
    assert (model_dir / "MLmodel").exists()
    away = registry.artifact_root.with_name(f"{registry.artifact_root.name}.away")
    registry.artifact_root.rename(away)
    try:
        from registry.errors import ModelNotFound
        from registry.mlflow_registry import MlflowRegistry

        probe = MlflowRegistry(settings.tracking_uri)
        with pytest.raises(ModelNotFound, match="missing from the artifact store"):
            probe.download(probe.resolve("models:/churn/1"), tmp_path / "probe")
        again = steps.resolve(settings, params, run_id="scheduled__2026-11-24")  # a retry
        assert again["model_version"] == ref["model_version"]
        for step in (steps.plan, steps.score, steps.validate, steps.export, steps.publish):
            step(ref["run_dir"])
    finally:
        away.rename(registry.artifact_root)
    manifest = load_manifest(ref["run_dir"])
    assert manifest.published and manifest.steps["score"]["rows"] == 12_000
    assert set(manifest.steps["score"]["model_loads_per_worker"].values()) == {1}
