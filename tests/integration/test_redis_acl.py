"""An ACL user other than ``default``, with only the rights docs/stores.md lists, on a
real single Redis and a real Redis Cluster: ``batchscore run`` exports and publishes a
second version over the first (deleting none, then the older), the lookup API answers
from the store, ``versions`` and ``gc`` work; a user without write rights gets a clear
error naming the store and the refused command, and the live version stays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import KEY, RedisClusterServers, RedisServer, Registry, run_cli

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

ADMIN = "admin pw"
USER, PASSWORD = "scorer", "scorer-pw"
READER, READER_PASSWORD = "viewer", "viewer-pw"
# The rights a batchscore user needs (docs/stores.md, "An ACL user"): its keys only, the
# data commands, transactions, WAIT, and what a client asks of a server or a cluster.
SCORER_RULES = (
    "~bs:* resetchannels -@all +@read +@write +@transaction +@connection -@dangerous "
    "+scan +info +role +time +wait +command +asking "
    "+cluster|slots +cluster|shards +cluster|nodes +cluster|info +cluster|myid"
)
VIEWER_RULES = (
    "~bs:* resetchannels -@all +@read +@connection -@dangerous +scan +info +role +time "
    "+command +asking +cluster|slots +cluster|shards +cluster|nodes +cluster|info +cluster|myid"
)
NS = "acl"
SAMPLE = [1_000_000, 1_004_321, 1_011_999]


def add_users(clients: list[redis.Redis]) -> None:
    for client in clients:
        client.execute_command(
            "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", *SCORER_RULES.split()
        )
        client.execute_command(
            "ACL", "SETUSER", READER, "reset", "on", f">{READER_PASSWORD}", *VIEWER_RULES.split()
        )


@pytest.fixture
def single(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis", "--requirepass", ADMIN)
    (tmp_path / "redis").mkdir()
    server.start(password=ADMIN)
    add_users([server.client()])
    yield f"redis://{{user}}@127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    servers = RedisClusterServers(tmp_path / "cluster", password=ADMIN)
    servers.start()
    add_users([redis.Redis(port=p, password=ADMIN) for p in servers.ports])
    seeds = servers.url.removeprefix("redis+cluster://")
    yield f"redis+cluster://{{user}}@{seeds}"
    servers.stop()


@pytest.mark.parametrize("store", ["single", "cluster"])
def test_an_acl_user_with_the_documented_rights_runs_publishes_and_serves(
    store: str,
    request: pytest.FixtureRequest,
    env: dict[str, str],
    registry: Registry,
    dataset: Path,
    tmp_path: Path,
    start_api: Any,
) -> None:
    template: str = request.getfixturevalue(store)
    url = template.format(user=USER)
    env = env | {"BATCHSCORE_STORE_PASSWORD": PASSWORD, "BATCHSCORE_KEEP_VERSIONS": "1"}
    summaries = []
    for model in ("models:/churn/1", "models:/churn/2"):
        summary_path = tmp_path / f"summary-{len(summaries)}.json"
        done = run_cli(
            "run", "--input", str(dataset), "--model", model, "--key-column", KEY,
            "--namespace", NS, "--store", url, "--summary-json", str(summary_path),
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        summaries.append(json.loads(summary_path.read_text()))
    assert [s["published"] for s in summaries] == [True, True]

    listed = run_cli("versions", NS, "--json", "--store", url, env=env)
    assert listed.returncode == 0, listed.stderr[-4000:]
    versions = json.loads(listed.stdout)
    assert versions["live"] == summaries[1]["version"]
    collected = run_cli("gc", NS, "--keep", "1", "--store", url, env=env)
    assert collected.returncode == 0, collected.stderr[-4000:]

    api = start_api(env, url)
    for key in SAMPLE:
        answer = api.get(f"/v1/predictions/{NS}/{key}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["source"] == "kv"
        assert answer.json()["run_id"] == summaries[1]["run_id"]

    # A user who may only read: the export is refused with the store and command named,
    # nothing is published, the lookup API (which only reads) still answers.
    viewer = template.format(user=READER)
    refused = run_cli(
        "run", "--input", str(dataset), "--model", "models:/churn/1", "--key-column", KEY,
        "--namespace", NS, "--store", viewer, "--force",
        env=env | {"BATCHSCORE_STORE_PASSWORD": READER_PASSWORD},
    )  # fmt: skip
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert "refused a command to this ACL user" in message, message[-3000:]
    # which command is refused first depends on the client (WATCH, or UNWATCH on reset)
    assert re.search(r"no permissions to run the '(un)?watch' command", message), message[-3000:]
    assert READER_PASSWORD not in refused.stderr
    after = run_cli("versions", NS, "--json", "--store", url, env=env)
    assert json.loads(after.stdout)["live"] == summaries[1]["version"]
    viewer_api = start_api(env | {"BATCHSCORE_STORE_PASSWORD": READER_PASSWORD}, viewer)
    answer = viewer_api.get(f"/v1/predictions/{NS}/{SAMPLE[0]}")
    assert answer.status_code == 200 and answer.json()["source"] == "kv", answer.text
