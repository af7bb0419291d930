"""Every step and command opens the store the same way, and what a run did is per store.

A Redis that needs a password, given only as ``BATCHSCORE_STORE_PASSWORD`` (as job
configs and docker-compose give it): the whole pipeline (drift gate included), ``status``,
``versions``, ``rollback``, ``gc``, ``serve``, the DAG and a shadow run all reach it; an
ACL user in the URL with the password from the setting; a wrong or missing password fails
before any scoring with one line naming the store (no secret) and the setting. The same
run aimed at another store exports and publishes there, once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kv_export.store import open_store
from tests.conftest import (
    KEY,
    ApiProcess,
    RedisServer,
    Registry,
    client_alias,
    direct_forward,
    read_rows,
    run_cli,
)
from tests.integration.test_dag import airflow_home, dags_test  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]
PASSWORD = "s3cret-store"
SAMPLE = [1_000_000, 1_005_555, 1_011_999]


@pytest.fixture
def locked_redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path, "--requirepass", PASSWORD)
    server.start(password=PASSWORD)
    yield server  # type: ignore[misc]
    server.stop()


def run(env: dict[str, str], dataset: Path, tmp: Path, *extra: str) -> dict:
    """``batchscore run`` on the test dataset; its summary JSON (the run must succeed)."""
    summary = tmp / f"summary-{len(list(tmp.glob('summary-*')))}.json"
    done = run_cli(
        "run", "--input", str(dataset), "--key-column", KEY, "--summary-json", str(summary),
        *extra, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(summary.read_text()))


def cli_json(env: dict[str, str], *args: str) -> dict:
    done = run_cli(*args, "--json", env=env | {"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def expected_predictions(registry: Registry, dataset: Path, model_uri: str) -> np.ndarray:
    rows = read_rows(dataset, SAMPLE)
    stacked = np.stack([rows[k] for k in SAMPLE])
    return direct_forward(registry.tracking_uri, model_uri, stacked)[:, 0]


def api_predictions(api: ApiProcess, namespace: str) -> list[float]:
    found = []
    for key in SAMPLE:
        answer = api.get(f"/v1/predictions/{namespace}/{key}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["source"] == "kv"
        found.extend(answer.json()["prediction"].values())
    return found


def test_every_step_and_command_takes_the_password_from_the_setting(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    locked_redis: RedisServer,
    start_api,  # noqa: ANN001
    api_env: dict[str, str],
) -> None:
    locked = env | {
        "BATCHSCORE_STORE_URL": locked_redis.url,  # no password in the URL
        "BATCHSCORE_STORE_PASSWORD": PASSWORD,
    }
    first = run(locked, dataset, tmp_path, "--model", "models:/churn/1", "--namespace", "locked")
    assert first["published"] and first["store"] == locked_redis.url
    # The second run's drift gate reads the live version from the locked store.
    second = run(
        locked, dataset, tmp_path, "--model", "models:/churn/2", "--namespace", "locked", "--force"
    )
    assert second["published"] and second["drift"]["compared"] is True
    assert second["drift"]["live_version"] == first["version"]

    status = cli_json(locked, "status", "locked")
    assert status["store"] == locked_redis.url and status["live"] == second["version"]
    assert status["last_run"]["stores"][locked_redis.url]["published"] is True
    versions = cli_json(locked, "versions", "locked")
    assert sorted(versions["versions"]) == sorted(str(v) for v in (1, 2))
    back = run_cli("rollback", "locked", env=locked)
    assert back.returncode == 0 and f"{second['version']} → {first['version']}" in back.stdout
    collected = run_cli("gc", "locked", "--keep", "1", env=locked)
    assert collected.returncode == 0, collected.stderr
    assert f"deleted {second['version']}" in collected.stdout

    api = start_api(api_env | {"BATCHSCORE_STORE_PASSWORD": PASSWORD}, locked_redis.url)
    np.testing.assert_allclose(
        api_predictions(api, "locked"),
        expected_predictions(registry, dataset, "models:/churn/1"),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.airflow
def test_the_dag_and_a_shadow_run_take_the_password_from_the_setting(
    airflow_home: Path,  # noqa: F811
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    locked_redis: RedisServer,
) -> None:
    locked = env | {
        "BATCHSCORE_STORE_URL": locked_redis.url,
        "BATCHSCORE_STORE_PASSWORD": PASSWORD,
    }
    client_alias("churn", "2", registry.tracking_uri, alias="contender")
    conf = {"input_path": str(dataset), "model_uri": "models:/churn@champion", "key_column": KEY}
    done = dags_test(airflow_home, locked, conf | {"namespace": "locked_dag"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    shadow = dags_test(
        airflow_home,
        locked,
        conf | {"namespace": "locked_dag", "shadow": "contender", "force": True},
    )
    assert shadow.returncode == 0, (shadow.stdout + shadow.stderr)[-5000:]

    store = open_store(locked_redis.url, password=PASSWORD)
    state = store.state("locked_dag")
    live = state.live_info()
    assert live is not None and live.model_version == "1" and live.key_count == 12_000
    unpublished = [i for i in state.versions.values() if i.published_at is None]
    assert [i.model_version for i in unpublished] == ["2"], "the shadow version, loaded only"
    runs = Path(env["BATCHSCORE_HOME"]) / "runs" / "locked_dag"
    reports = list(runs.glob("*/reports/shadow_comparison.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["live"]["version"] == 1


def test_an_acl_user_in_the_url_with_the_password_from_the_setting(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    start_api,  # noqa: ANN001
    api_env: dict[str, str],
) -> None:
    server = RedisServer(
        tmp_path, "--user", "default", "off", "--user", "scorer", "on", f">{PASSWORD}",
        "~*", "&*", "+@all",
    )  # fmt: skip
    server.start(username="scorer", password=PASSWORD)
    try:
        url = f"redis://scorer@127.0.0.1:{server.port}/0"
        acl = env | {"BATCHSCORE_STORE_URL": url, "BATCHSCORE_STORE_PASSWORD": PASSWORD}
        summary = run(acl, dataset, tmp_path, "--model", "models:/churn/1", "--namespace", "acl")
        assert summary["published"] and summary["store"] == url
        assert cli_json(acl, "status", "acl")["live"] == summary["version"]
        api = start_api(api_env | {"BATCHSCORE_STORE_PASSWORD": PASSWORD}, url)
        np.testing.assert_allclose(
            api_predictions(api, "acl"),
            expected_predictions(registry, dataset, "models:/churn/1"),
            rtol=1e-5,
            atol=1e-6,
        )
    finally:
        server.stop()


@pytest.mark.parametrize("given", ["wrong-password", None])
def test_a_wrong_or_missing_password_fails_before_any_scoring(
    env: dict[str, str], dataset: Path, locked_redis: RedisServer, given: str | None
) -> None:
    bad = env | {"BATCHSCORE_STORE_URL": locked_redis.url}
    if given:
        bad["BATCHSCORE_STORE_PASSWORD"] = given
    done = run_cli(
        "run", "--input", str(dataset), "--model", "models:/churn/1", "--key-column", KEY,
        "--namespace", "refused", env=bad | {"COLUMNS": "300"},
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert locked_redis.url in errors[0] and "refused the credentials" in errors[0]
    assert "BATCHSCORE_STORE_PASSWORD" in errors[0]
    assert "wrong-password" not in done.stderr + done.stdout
    runs = Path(env["BATCHSCORE_HOME"]) / "runs"
    assert not list(runs.glob("refused/*/parts/*")), "nothing was scored"
    assert not list(runs.glob("refused/*/manifest.json")), "the run was not even created"
    for command in ("status", "versions"):
        refused = run_cli(command, "refused", env=bad | {"COLUMNS": "300"})
        assert refused.returncode != 0 and "BATCHSCORE_STORE_PASSWORD" in refused.stderr


def test_the_same_run_publishes_once_in_each_store(
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    start_api,  # noqa: ANN001
    api_env: dict[str, str],
) -> None:
    args = ("--model", "models:/churn/1", "--namespace", "twice")
    embedded = run(env, dataset, tmp_path, *args)
    in_redis = run(env, dataset, tmp_path, *args, "--store", redis_server.url)
    again = run(env, dataset, tmp_path, *args, "--store", redis_server.url)

    assert embedded["run_id"] == in_redis["run_id"] == again["run_id"], "one run, two stores"
    assert in_redis["store"] == redis_server.url and embedded["store"].startswith("lmdb://")
    assert in_redis["published"] and in_redis["steps"]["publish"]["note"] == "published"
    assert in_redis["steps"]["score"]["rows_scored"] == 0, "the parts were scored once"
    assert again["steps"]["export"]["reused"] is True and again["version"] == in_redis["version"]
    assert again["steps"]["publish"]["note"] == "already live", "nothing published twice"
    assert set(again["stores"]) == {embedded["store"], redis_server.url}
    assert all(record["published"] for record in again["stores"].values())
    assert again["stores"][redis_server.url] == in_redis["stores"][redis_server.url]
    state = open_store(redis_server.url).state("twice")
    assert list(state.versions) == [in_redis["version"]] and state.history == [in_redis["version"]]

    status = cli_json(env, "status", "twice", "--store", redis_server.url)
    assert status["store"] == redis_server.url and status["live"] == in_redis["version"]
    expected = expected_predictions(registry, dataset, "models:/churn/1")
    home = env["BATCHSCORE_HOME"]
    for store_url in (f"lmdb://{home}/store", redis_server.url):
        api = start_api(api_env | {"BATCHSCORE_HOME": home}, store_url)
        np.testing.assert_allclose(api_predictions(api, "twice"), expected, rtol=1e-5, atol=1e-6)
        api.stop()


def test_status_and_versions_of_a_namespace_the_store_does_not_hold(
    env: dict[str, str], redis_server: RedisServer
) -> None:
    for command in ("status", "versions"):
        done = run_cli(
            command, "nowhere", "--store", redis_server.url, env=env | {"COLUMNS": "300"}
        )
        assert done.returncode != 0
        assert f"Store {redis_server.url} holds no namespace 'nowhere'" in done.stderr


def test_a_password_in_the_store_url_reaches_no_file_and_no_output(
    env: dict[str, str], dataset: Path, tmp_path: Path, locked_redis: RedisServer
) -> None:
    url = locked_redis.url.replace("redis://", f"redis://:{PASSWORD}@")
    done = run_cli(
        "run", "--input", str(dataset), "--model", "models:/churn/1", "--key-column", KEY,
        "--namespace", "secretive", "--store", url, "--summary-json", str(tmp_path / "s.json"),
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert PASSWORD not in done.stdout + done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["published"] and summary["store"] == locked_redis.url
    written = [p for p in Path(env["BATCHSCORE_HOME"]).rglob("*") if p.is_file()]
    assert written and not [p for p in written if PASSWORD.encode() in p.read_bytes()]
    assert PASSWORD not in (tmp_path / "s.json").read_text()
    # A later step in another process (an Airflow task, `batchscore step`) has only the
    # setting to go by, and says which one to set.
    run_dir = Path(summary["run_dir"])
    again = run_cli("step", "publish", str(run_dir), env=env | {"COLUMNS": "300"})
    assert again.returncode != 0 and "BATCHSCORE_STORE_PASSWORD" in again.stderr
    with_setting = run_cli(
        "step", "publish", str(run_dir), env=env | {"BATCHSCORE_STORE_PASSWORD": PASSWORD}
    )
    assert with_setting.returncode == 0, with_setting.stderr
