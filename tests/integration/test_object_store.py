"""Input on an object store: a real S3-compatible server (moto's server mode) on loopback.

The server authenticates every request once the fixtures have set it up (``tests.s3``),
so credentials are checked by the server, as AWS checks them. The pipeline reaches it
through the standard AWS variables only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, or ``AWS_PROFILE``): no batchscore setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.core.errors import BatchscoreError
from batchscore.core.settings import RunSettings, load_settings
from jobs import steps
from jobs.manifest import load_manifest
from jobs.pipeline import run_pipeline
from kv_export.store import open_store
from scoring.errors import CorruptInput, InputAccessDenied, InputNotFound
from scoring.inputs import inspect_input
from tests.conftest import BIN, KEY, N_FEATURES, Registry, run_cli
from tests.integration.test_pipeline import check_run
from tests.s3 import AWS_VARIABLES, AccessKey, CountingProxy, S3Server

pytestmark = [pytest.mark.s3]
BUCKET = "data"
SECRET_OBJECT = "churn-denied/dt=2026-11-21/part-0001.parquet"


class Store:
    """The running server and the keys the tests use."""

    def __init__(self, server: S3Server, admin: AccessKey, reader: AccessKey) -> None:
        self.server = server
        self.admin = admin
        self.reader = reader  # may list everything, may not read SECRET_OBJECT


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Iterator[Store]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        server.upload_folder(dataset, BUCKET, "churn")
        server.upload_folder(dataset, BUCKET, "churn-denied")
        client.put_object(Bucket=BUCKET, Key="notes/readme.txt", Body=b"no parquet here")
        client.put_object(Bucket=BUCKET, Key="notes/_SUCCESS", Body=b"")
        admin = server.user("admin")
        deny = {
            "Effect": "Deny",
            "Action": ["s3:GetObject"],
            "Resource": f"arn:aws:s3:::{BUCKET}/{SECRET_OBJECT}",
        }
        allow = {"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}
        reader = server.user("reader", {"Version": "2012-10-17", "Statement": [allow, deny]})
        server.authenticate()
        yield Store(server, admin, reader)
    finally:
        server.stop()


@pytest.fixture
def aws(
    s3: Store, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The run's environment with the admin's key, in this process and for subprocesses."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    values = s3.server.env(s3.admin, tmp_path / "aws")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {k: v for k, v in env.items() if k not in AWS_VARIABLES} | values


def parts_table(run_dir: str) -> pa.Table:
    manifest = load_manifest(run_dir)
    tables = [pq.read_table(s.part) for s in manifest.shards]
    return pa.concat_tables(tables).sort_by(KEY)


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_run_from_s3_scores_what_a_local_run_scores(
    aws: dict[str, str], registry: Registry, dataset: Path, tmp_path: Path
) -> None:
    summaries = {}
    for name, source in (("s3", f"s3://{BUCKET}/churn/"), ("local", str(dataset))):
        summary_path = tmp_path / f"{name}.json"
        done = run_cli(
            "run", "--input", source, "--model", "models:/churn/1", "--key-column", KEY,
            "--namespace", f"churn_{name}", "--summary-json", str(summary_path),
            env=aws,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        summaries[name] = json.loads(summary_path.read_text())
    remote = summaries["s3"]
    store_url = load_settings(RunSettings).resolved_store_url
    check_run(store_url, remote, registry, dataset, "models:/churn/1")
    manifest = load_manifest(remote["run_dir"])
    assert manifest.input is not None and manifest.input.root == f"s3://{BUCKET}/churn/"
    assert manifest.input.files == 3 and manifest.input.rows == 12_000
    pieces = [p.path for s in manifest.shards for p in s.pieces]
    assert pieces and all(p.startswith(f"s3://{BUCKET}/churn/dt=") for p in pieces)
    # Every prediction equals the local run's, key for key.
    assert parts_table(remote["run_dir"]).equals(parts_table(summaries["local"]["run_dir"]))


def test_planning_lists_the_prefix_and_reads_only_footers(s3: Store, aws: dict[str, str]) -> None:
    from batchscore.samples import feature_names

    summary = inspect_input(f"s3://{BUCKET}/churn", feature_names(N_FEATURES), KEY)
    assert summary.rows == 12_000 and len(summary.files) == 3
    assert [f.row_group_rows for f in summary.files] == [(1000,) * 4] * 3
    assert all(f.path.startswith(f"s3://{BUCKET}/churn/dt=") for f in summary.files)
    # One object, named directly, is an input of its own.
    single = summary.files[0].path
    assert inspect_input(single, feature_names(N_FEATURES), KEY).rows == 4_000


def test_a_profile_in_the_shared_credentials_file_is_used(
    s3: Store, aws: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchscore.samples import feature_names

    credentials = tmp_path / "aws" / "aws-credentials"
    credentials.write_text(
        f"[team]\naws_access_key_id = {s3.admin.key_id}\n"
        f"aws_secret_access_key = {s3.admin.secret}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "team")
    summary = inspect_input(f"s3://{BUCKET}/churn/", feature_names(N_FEATURES), KEY)
    assert summary.rows == 12_000


# Bad input: each fails before any scoring, with the URL and no secret in the message.


def attempt(input_url: str, expected: type[BatchscoreError], *secrets: str) -> str:
    settings = load_settings(RunSettings)
    with pytest.raises(BatchscoreError) as caught:
        params = steps.make_params(
            settings, input_path=input_url, model_uri="models:/churn/1", key_column=KEY,
            namespace="bad_s3",
        )  # fmt: skip
        run_pipeline(settings, params)
    message = str(caught.value)
    assert isinstance(caught.value, expected), message
    for secret in secrets:
        assert secret not in message
    assert open_store(settings.resolved_store_url).state("bad_s3").versions == {}
    runs = settings.runs_dir / "bad_s3"
    for manifest in runs.glob("*/manifest.json"):
        assert "score" not in json.loads(manifest.read_text())["steps"], "nothing scored"
    return message


def test_a_missing_bucket(s3: Store, aws: dict[str, str]) -> None:
    message = attempt("s3://no-such-bucket/churn/", InputNotFound, s3.admin.secret)
    assert "s3://no-such-bucket/churn/" in message and "does not exist" in message


def test_a_prefix_with_no_parquet(s3: Store, aws: dict[str, str]) -> None:
    message = attempt(f"s3://{BUCKET}/notes/", InputNotFound, s3.admin.secret)
    assert f"s3://{BUCKET}/notes/ holds no Parquet objects" in message
    message = attempt(f"s3://{BUCKET}/nothing-here/", InputNotFound)
    assert f"s3://{BUCKET}/nothing-here/" in message


def test_no_credentials(s3: Store, aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = attempt(f"s3://{BUCKET}/churn/", InputAccessDenied)
    assert f"s3://{BUCKET}/churn/" in message and "none found" in message
    assert "AWS_ACCESS_KEY_ID" in message  # how to fix it


def test_wrong_credentials(s3: Store, aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_secret = "not-the-secret-" + s3.admin.secret[:8]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    message = attempt(f"s3://{BUCKET}/churn/", InputAccessDenied, wrong_secret)
    assert f"s3://{BUCKET}/churn/" in message and "AWS_ACCESS_KEY_ID" in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    message = attempt(f"s3://{BUCKET}/churn/", InputAccessDenied, wrong_secret)
    assert "denied" in message


def test_a_denied_object(s3: Store, aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.reader.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.reader.secret)
    message = attempt(f"s3://{BUCKET}/churn-denied/", InputAccessDenied, s3.reader.secret)
    assert f"s3://{BUCKET}/{SECRET_OBJECT}" in message  # the object, not only the prefix


@pytest.mark.parametrize("secret", ["admin's", "with/a+slash"])
def test_credentials_in_the_url_are_refused(s3: Store, aws: dict[str, str], secret: str) -> None:
    secret = s3.admin.secret if secret == "admin's" else "Abc/def+ghi" + s3.admin.secret[:8]
    url = f"s3://{s3.admin.key_id}:{secret}@{BUCKET}/churn/"
    message = attempt(url, InputAccessDenied, secret)
    assert f"s3://{BUCKET}/churn/" in message and "carries credentials" in message
    for part in filter(None, secret.split("/")):  # a generated secret may start with "/"
        assert part not in message


def test_an_endpoint_that_does_not_answer(
    s3: Store, aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchscore.testing import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    message = attempt(f"s3://{BUCKET}/churn/", InputNotFound, s3.admin.secret)
    assert f"s3://{BUCKET}/churn/ could not be reached" in message and closed in message


def test_a_corrupt_object(s3: Store, aws: dict[str, str]) -> None:
    client = s3.server.client(key=s3.admin)
    client.put_object(Bucket=BUCKET, Key="broken/part-0.parquet", Body=b"PAR1 not parquet")
    message = attempt(f"s3://{BUCKET}/broken/", CorruptInput)
    assert f"s3://{BUCKET}/broken/part-0.parquet" in message


def test_footers_are_read_with_ranged_requests(
    s3: Store, aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning a large object fetches its footer, not the object (bytes on the wire)."""
    from batchscore.samples import feature_names

    rng = np.random.default_rng(0)
    rows = 400_000
    columns = {KEY: np.arange(rows, dtype=np.int64)}
    columns |= {f: rng.standard_normal(rows).astype(np.float32) for f in feature_names(N_FEATURES)}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, row_group_size=50_000, compression="none")
    body = sink.getvalue().to_pybytes()
    client = s3.server.client(key=s3.admin)
    client.put_object(Bucket=BUCKET, Key="big/part-0.parquet", Body=body)
    proxy = CountingProxy(s3.server.port)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        summary = inspect_input(f"s3://{BUCKET}/big/", feature_names(N_FEATURES), KEY)
    finally:
        proxy.close()
    assert summary.rows == rows
    assert 0 < proxy.received < len(body) // 50, f"planning fetched {proxy.received} bytes"


# Run folders on the object store (BATCHSCORE_OUTPUT_DIR=s3://...).

RUNS = f"s3://{BUCKET}/runs"


def part_keys(s3: Store, namespace: str) -> dict[str, int]:
    """The complete parts of the namespace's run on the store: object key → size."""
    client = s3.server.client(key=s3.admin)
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"runs/{namespace}/"
    ):
        for item in page.get("Contents", []):
            name = item["Key"].rsplit("/", 1)[-1]
            # (pyarrow keeps an empty "parts/" marker object: a folder, not a part)
            if "/parts/" in item["Key"] and name and not name.startswith("."):
                found[item["Key"]] = item["Size"]
    return found


def part_rows(s3: Store, namespace: str) -> list[int]:
    keys: list[int] = []
    for key in part_keys(s3, namespace):
        keys += pq.read_table(f"s3://{BUCKET}/{key}", columns=[KEY]).column(KEY).to_pylist()
    return keys


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.redis
def test_run_folder_on_s3_and_the_fallback_reads_its_parts(
    s3: Store,
    aws: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    redis_server: Any,
    start_api: Any,
    api_env: dict[str, str],
) -> None:
    summary_path = tmp_path / "summary.json"
    run_env = aws | {"BATCHSCORE_OUTPUT_DIR": RUNS}
    done = run_cli(
        "run", "--input", f"s3://{BUCKET}/churn/", "--model", "models:/churn/1",
        "--key-column", KEY, "--namespace", "remote", "--store", redis_server.url,
        "--summary-json", str(summary_path),
        env=run_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["run_dir"].startswith(f"{RUNS}/remote/run-")
    check_run(redis_server.url, summary, registry, dataset, "models:/churn/1")
    assert "could not record" not in done.stderr, done.stderr[-4000:]  # MLflow got it all
    manifest = load_manifest(summary["run_dir"])  # read from the store
    from mlflow import MlflowClient

    artifacts = MlflowClient(registry.tracking_uri).list_artifacts(manifest.mlflow_run_id)
    assert "manifest.json" in {a.path for a in artifacts}
    assert all(s.part.startswith(f"{RUNS}/remote/") and s.state == "done" for s in manifest.shards)
    assert len(part_keys(s3, "remote")) == len(manifest.shards) == 6, part_keys(s3, "remote")
    keys = part_rows(s3, "remote")
    assert len(keys) == len(set(keys)) == 12_000
    listed = s3.server.client(key=s3.admin).list_objects_v2(Bucket=BUCKET, Prefix="runs/remote/")
    staged = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".tmp")]
    assert not staged, f"temporary objects left behind: {staged}"

    status = run_cli("status", "remote", "--store", redis_server.url, "--json", env=run_env)
    assert status.returncode == 0, status.stderr[-4000:]
    assert json.loads(status.stdout)["last_run"]["run_id"] == summary["run_id"]

    # Redis goes away: the API answers from the run's parts on the object store.
    api = start_api(api_env | s3.server.env(s3.admin, tmp_path / "api-aws"), redis_server.url)
    sample = [1_000_000, 1_005_555]
    kv = [api.get(f"/v1/predictions/remote/{k}").json() for k in sample]
    assert [a["source"] for a in kv] == ["kv", "kv"]
    redis_server.stop()
    deadline = time.monotonic() + 30
    while True:
        answers = [api.get(f"/v1/predictions/remote/{k}") for k in sample]
        if all(a.status_code == 200 and a.json()["source"] == "batch" for a in answers):
            break
        assert time.monotonic() < deadline, [a.text for a in answers]
        time.sleep(0.2)
    for before, after in zip(kv, answers, strict=True):
        assert after.json()["prediction"] == before["prediction"]
    assert api.get("/v1/predictions/remote/42").status_code == 404


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_killed_while_scoring_to_s3_resumes_with_every_row_once(
    s3: Store, aws: dict[str, str], dataset: Path, tmp_path: Path
) -> None:
    """SIGKILL of the whole run (its process group) once parts are on the store, then the
    same command again: only the missing shards are scored, every key is in one part."""
    run_env = aws | {"BATCHSCORE_OUTPUT_DIR": RUNS, "BATCHSCORE_SHARD_ROWS": "1000"}
    command = [
        str(BIN / "batchscore"), "run", "--input", f"s3://{BUCKET}/churn/",
        "--model", "models:/churn/1", "--key-column", KEY, "--namespace", "killed",
        "--cluster", "processes", "--workers", "2", "--batch-size", "64",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=run_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(part_keys(s3, "killed")) < 2:
            assert process.poll() is None, process.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no part was written in 240 s"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate(timeout=60)
    before = part_rows(s3, "killed")
    assert 0 < len(before) < 12_000, "the kill came too late to leave shards to score"
    again = subprocess.run(
        command, env=run_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    (run_dir,) = {k.split("/parts/")[0] for k in part_keys(s3, "killed")}
    manifest = load_manifest(f"s3://{BUCKET}/{run_dir}")
    assert len(before) + manifest.steps["score"]["rows_scored"] == 12_000
    keys = part_rows(s3, "killed")
    assert len(keys) == len(set(keys)) == 12_000
    assert manifest.published


def _fetched_models() -> list[str]:
    import tempfile

    folder = Path(tempfile.gettempdir()) / "batchscore-models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_running_cluster_scores_from_s3_into_s3_with_the_model_from_the_store(
    s3: Store, aws: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers of a running cluster (``dask worker`` processes, started with the AWS
    variables as a deployment gives them) read their row groups, write their parts and
    fetch the model through the store, as workers on other hosts would."""
    from batchscore.devcluster import RunningCluster
    from tests.conftest import run_job

    monkeypatch.setenv("BATCHSCORE_OUTPUT_DIR", RUNS)
    repo = str(Path(__file__).resolve().parents[2])
    cluster = RunningCluster(tmp_path / "cluster", 2, pythonpath=repo)
    try:
        manifest = run_job(
            f"s3://{BUCKET}/churn/",  # type: ignore[arg-type]
            "models:/churn/1",
            "on_cluster",
            cluster=cluster.address,
        )
        fetched = list(cluster.client.run(_fetched_models).values())
    finally:
        cluster.stop()
    assert manifest.published and manifest.summary()["rows"] == 12_000
    assert manifest.run_dir.startswith(f"{RUNS}/on_cluster/")
    assert all(s.part.startswith(RUNS) for s in manifest.shards)
    keys = part_rows(s3, "on_cluster")
    assert len(keys) == len(set(keys)) == 12_000
    # Each worker loaded the run's model from its copy on the store, fetched to its machine.
    model_url = f"{manifest.run_dir}/model"
    name = hashlib.sha256(model_url.encode()).hexdigest()[:16]
    assert fetched and all(name in found for found in fetched), fetched
