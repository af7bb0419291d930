"""The lookup API against hostile input and faults (issue 16), over real HTTP: ``batchscore
serve`` in a subprocess, on a real redis-server or the embedded store.

Memory is measured as the server process's peak resident set (``VmHWM``): what a body
or an outage made it hold at its worst, not what it still holds afterwards.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from kv_export.encoding import bucket_count, encode_keys, pack_values
from kv_export.export import export_parts
from kv_export.store import NewVersion, PartInfo, open_store, utcnow
from tests.conftest import ApiProcess, RedisServer, free_port, run_cli
from tests.integration.test_api_service import KEYS, NS, Start, check, get, score, write_version

pytestmark = [pytest.mark.slow]
MB = 1 << 20


def peak_rss(api: ApiProcess) -> int:
    """The server process's peak resident set so far, in bytes."""
    for line in Path(f"/proc/{api.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def serve_fails(env: dict[str, str], store_url: str) -> str:
    """``batchscore serve`` that must refuse to start: its output (it must exit, not serve)."""
    try:
        done = run_cli(
            "serve", "--store", store_url, "--port", str(free_port()), env=env, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("batchscore serve started serving; it should have refused to start")
    assert done.returncode != 0
    return done.stdout + done.stderr


# 3. Authentication never turns itself off ------------------------------------------------


def test_configured_but_empty_api_keys_refuse_to_start_and_auth_off_is_logged(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS[:100], "1")
    empty, comments = tmp_path / "empty.txt", tmp_path / "comments.txt"
    empty.write_text("")
    comments.write_text("# nobody yet\n\n   # still nobody\n")
    for keys_file in (empty, comments):
        said = serve_fails(api_env | {"BATCHSCORE_API_KEYS_FILE": str(keys_file)}, store_url)
        assert "BATCHSCORE_API_KEYS_FILE" in said and str(keys_file) in said, said
    said = serve_fails(api_env | {"BATCHSCORE_API_KEYS": "{}"}, store_url)
    assert "BATCHSCORE_API_KEYS" in said, said

    api = start_api(api_env, store_url)  # no keys configured at all: off, and it says so
    key = int(KEYS[3])
    check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "1", "kv")
    assert "authentication is off" in api.log.read_text()


# 4. Bodies are bounded before they are read --------------------------------------------


def test_a_50_mb_body_gets_401_or_413_fast_and_the_server_memory_stays_bounded(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS[:100], "1")
    api = start_api(api_env | {"BATCHSCORE_API_KEYS": json.dumps({"k1": ["*"]})}, store_url)
    batch = f"{api.base}/v1/predictions/{NS}/batch"
    small = httpx.post(batch, json={"keys": [str(KEYS[0])]}, headers={"x-api-key": "k1"})
    check(small.json()["results"][0], int(KEYS[0]), "1", "kv")
    before = peak_rss(api)

    key = "x" * 1000
    body = b'{"keys": [' + b",".join([b'"%s"' % key.encode()] * (51 * MB // 1003)) + b"]}"
    assert len(body) > 50 * MB
    json_type = {"content-type": "application/json"}
    with httpx.Client(timeout=5) as client:  # "fast": each answer within 5 s
        anonymous = client.post(batch, content=body, headers=json_type)
        assert anonymous.status_code in (401, 413), anonymous.text
        declared = client.post(batch, content=body, headers=json_type | {"x-api-key": "k1"})
        assert declared.status_code == 413, declared.text
        assert declared.json()["error"]["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: read as it comes, then cut
            for start in range(0, len(body), MB):
                yield body[start : start + MB]

        streamed = client.post(batch, content=chunks(), headers=json_type | {"x-api-key": "k1"})
        assert streamed.status_code == 413, streamed.text
    grown = peak_rss(api) - before
    assert grown < 20 * MB, f"the server's peak memory grew {grown / MB:.0f} MB"

    # The schema bounds a key's length and the number of keys, whatever the settings say.
    schema = get(api, "/openapi.json").json()
    request = schema["paths"]["/v1/predictions/{namespace}/batch"]["post"]["requestBody"]
    keys = request["content"]["application/json"]["schema"]
    keys = schema["components"]["schemas"]["BatchRequest"] if "$ref" in keys else keys
    assert keys["properties"]["keys"]["maxItems"] >= 1
    assert keys["properties"]["keys"]["items"]["maxLength"] >= 1
    assert small.status_code == 200  # and an ordinary batch still works


# 5. Guessing keys is rate limited per client address -------------------------------------


def test_failed_authentications_are_rate_limited_per_client_address(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS[:100], "1")
    api = start_api(
        api_env
        | {
            "BATCHSCORE_API_KEYS": json.dumps({"right-key": ["*"]}),
            "BATCHSCORE_AUTH_FAILURES_PER_MINUTE": "5",
        },
        store_url,
    )
    path = f"/v1/predictions/{NS}/{int(KEYS[0])}"
    assert get(api, path, **{"x-api-key": "right-key"}).status_code == 200
    guesses = [get(api, path, **{"x-api-key": f"guess-{i}"}) for i in range(8)]
    assert [g.status_code for g in guesses] == [401] * 5 + [429] * 3
    assert guesses[-1].json()["error"]["code"] == "rate_limited"
    assert int(guesses[-1].headers["retry-after"]) >= 1
    # While the address's bucket is empty it gets no answer about any key, a right one too.
    assert get(api, path, **{"x-api-key": "right-key"}).status_code == 429
    assert get(api, path).status_code == 429  # no key at all is a failure too
    assert get(api, "/healthz").status_code == 200  # probes need no key


# 7. A malformed namespace state fails that namespace alone ------------------------------


@pytest.mark.redis
def test_a_malformed_namespace_state_fails_its_namespace_alone(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    write_version(redis_server.url, tmp_path / "v1", KEYS, "1")
    client = redis.Redis(port=redis_server.port)
    client.set("bs:{badjson}:state", b'{"live": 1, "versions": {')
    client.set("bs:{badbytes}:state", b"\xff\xfe\x00garbage")
    client.hset("bs:{ahash}:state", "live", "1")  # not a string: GET answers WRONGTYPE
    client.set(b"bs:{\xff\xfe}:state", b"{}")  # a state key whose name is not UTF-8

    api = start_api(api_env, redis_server.url)  # starts, whatever those keys hold
    key = int(KEYS[11])
    for _ in range(3):
        for bad in ("badjson", "badbytes", "ahash"):
            answer = get(api, f"/v1/predictions/{bad}/{key}")
            assert answer.status_code == 500, answer.text
            assert answer.json()["error"]["code"] == "namespace_state_invalid"
            assert bad in answer.json()["error"]["message"]
            assert get(api, f"/v1/namespaces/{bad}").status_code == 500
        check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "1", "kv")
    assert 'batchscore_store_circuit_state{state="closed"} 1.0' in get(api, "/metrics").text
    assert get(api, "/readyz").json()["status"] == "ready"
    listed = get(api, "/v1/namespaces").json()
    assert [n["namespace"] for n in listed["namespaces"]] == [NS]


@pytest.mark.redis
def test_an_unexpected_error_is_a_generic_500_without_a_stack_trace(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    """A state record that parses but does not match its values (two outputs named, one
    number stored per key) makes decoding a value fail with an error no handler expects:
    the client gets the generic 500, with no traceback, no file path and not the error's
    text; the log keeps the traceback."""
    write_version(redis_server.url, tmp_path / "v1", KEYS, "1")
    client = redis.Redis(port=redis_server.port)
    state_key = f"bs:{{{NS}}}:state"
    state = json.loads(client.get(state_key) or b"{}")
    for record in state["versions"].values():
        record["outputs"] = ["churn_probability", "one_too_many"]
    client.set(state_key, json.dumps(state))

    api = start_api(api_env, redis_server.url)
    for answer in (
        get(api, f"/v1/predictions/{NS}/{int(KEYS[3])}"),
        httpx.post(api.base + f"/v1/predictions/{NS}/batch", json={"keys": [str(KEYS[3])]}),
    ):
        assert answer.status_code == 500
        assert answer.json() == {"error": {"code": "internal", "message": "Internal error"}}
        assert answer.headers["content-type"] == "application/json"
        shown = answer.text + json.dumps(dict(answer.headers))
        for leak in ("Traceback", 'File "', ".py", str(tmp_path), "one_too_many", "numbers"):
            assert leak not in shown, leak
    assert "Traceback" in api.log.read_text()  # the operator still sees what failed
    assert get(api, "/healthz").status_code == 200  # and the server goes on serving


# 10. The API opens LMDB read-only, and a missing store is an error at start ---------------


def test_a_missing_embedded_store_is_an_error_at_start_naming_the_path(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "mistyped" / "store"
    said = serve_fails(api_env, f"lmdb://{missing}")
    assert str(missing) in said, said
    assert not (tmp_path / "mistyped").exists()  # nothing created


def open_for_writing(pid: int, name: str) -> list[bool]:
    """For each file descriptor of process ``pid`` open on a file called ``name``: whether
    it was opened for writing (its access mode is not O_RDONLY)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(fd.readlink()).name != name:
                continue
            flags = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1]
        except (OSError, IndexError):  # closed meanwhile
            continue
        found.append(int(flags.split()[0], 8) & 0o3 != 0)
    return found


def test_the_api_opens_the_embedded_store_read_only(
    api_env: dict[str, str], start_api: Start, tmp_path: Path
) -> None:
    store_url = f"lmdb://{tmp_path / 'store'}"
    write_version(store_url, tmp_path / "v1", KEYS[:100], "1")
    api = start_api(api_env, store_url)
    key = int(KEYS[3])
    check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "1", "kv")
    assert open_for_writing(api.process.pid, "data.mdb") == [False]


# 15. A key of the live version is never 404 -------------------------------------------


def publish_keep_one(store_url: str, folder: Path, model_version: str) -> None:
    """``write_version``, then publish with keep=1: the previous version's data is deleted."""
    store = open_store(store_url)
    folder.mkdir(parents=True)
    keys = KEYS[:1000]
    path = folder / "part-0000.parquet"
    table = pa.table({"customer_id": keys, "churn_probability": score(keys, model_version)})
    pq.write_table(table, path)
    new = NewVersion(
        run_id=f"run-{NS}-{model_version}",
        expected_keys=len(keys),
        buckets=bucket_count(len(keys)),
        outputs=["churn_probability"],
        model_name="churn",
        model_version=model_version,
        scored_at=utcnow(),
        key_column="customer_id",
        key_type="int",
        output_dir=str(folder),
        parts=[
            PartInfo(path=str(path), rows=len(keys), min_key=int(keys[0]), max_key=int(keys[-1]))
        ],
    )
    exported = export_parts(store, NS, new, [path])
    store.publish(NS, exported.info.version, keep=1)
    store.close()


@pytest.mark.redis
def test_a_key_of_the_live_version_is_never_404_when_the_cached_version_was_deleted(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    publish_keep_one(redis_server.url, tmp_path / "v1", "1")
    api = start_api(api_env | {"BATCHSCORE_LIVE_CACHE_SECONDS": "3600"}, redis_server.url)
    key = int(KEYS[5])
    check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "1", "kv")  # v1 cached

    publish_keep_one(redis_server.url, tmp_path / "v2", "2")  # v1's data deleted
    check(get(api, f"/v1/predictions/{NS}/{key}").json(), key, "2", "kv")
    other = int(KEYS[6])
    batch = httpx.post(f"{api.base}/v1/predictions/{NS}/batch", json={"keys": [str(other)]})
    check(batch.json()["results"][0], other, "2", "kv")
    absent = get(api, f"/v1/predictions/{NS}/42")  # a key no version has is still 404
    assert absent.status_code == 404 and "version 2" in absent.json()["error"]["message"]


# 8. The batch fallback's memory is bounded ----------------------------------------------

BIG_ROWS = 4_000_000
BIG_OUTPUTS = [f"p{i}" for i in range(8)]


def publish_big_parts(store_url: str, folder: Path) -> list[int]:
    """A version whose batch output is 4M rows of 8 outputs in 40 row groups (~160 MB
    decoded), of which the store holds only a few keys: the outage is what reads the rest."""
    keys = np.arange(BIG_ROWS, dtype=np.int64)
    column = (keys % 1000).astype(np.float32)
    folder.mkdir(parents=True)
    path = folder / "part-0000.parquet"
    table = pa.table({"customer_id": keys, **{name: column for name in BIG_OUTPUTS}})
    pq.write_table(table, path, row_group_size=100_000)
    del table, column
    stored = [0, 1, 2]
    store = open_store(store_url)
    new = NewVersion(
        run_id="run-big",
        expected_keys=len(stored),
        buckets=bucket_count(len(stored)),
        outputs=BIG_OUTPUTS,
        model_name="churn",
        model_version="1",
        scored_at=utcnow(),
        key_column="customer_id",
        key_type="int",
        output_dir=str(folder),
        parts=[PartInfo(path=str(path), rows=BIG_ROWS, min_key=0, max_key=BIG_ROWS - 1)],
    )
    info = store.begin_version("big", new)
    values = np.repeat(np.array(stored, dtype=np.float32)[:, None], len(BIG_OUTPUTS), axis=1)
    store.write("big", info, encode_keys(stored), pack_values(values))
    store.complete_version("big", info.version, len(stored))
    store.publish("big", info.version, keep=2)
    store.close()
    # Keys spread over every row group, a different set per request.
    return [int(k) for k in np.linspace(0, BIG_ROWS - 1, 1000, dtype=np.int64)]


@pytest.mark.redis
def test_the_batch_fallback_memory_is_bounded_under_concurrent_batches(
    api_env: dict[str, str], redis_server: RedisServer, start_api: Start, tmp_path: Path
) -> None:
    spread = publish_big_parts(redis_server.url, tmp_path / "big")
    api = start_api(api_env | {"BATCHSCORE_FALLBACK_MEMORY_BYTES": str(16 * MB)}, redis_server.url)
    assert get(api, "/v1/predictions/big/1").json()["source"] == "kv"
    before = peak_rss(api)
    redis_server.stop()

    answers: list[httpx.Response] = []

    def batches(offset: int) -> None:
        with httpx.Client(base_url=api.base, timeout=120) as client:
            for round_ in range(2):
                keys = [str(min(BIG_ROWS - 1, k + offset + round_)) for k in spread]
                answers.append(client.post("/v1/predictions/big/batch", json={"keys": keys}))

    threads = [threading.Thread(target=batches, args=(i * 7,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 12
    for answer in answers:
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert {r["source"] for r in results} == {"batch"}
        assert all(r["status"] == "found" for r in results)
        for r in results[:50]:
            assert r["prediction"]["p0"] == pytest.approx(int(r["key"]) % 1000)
    # Unbounded, these batches held every row group they touched: the peak grew ~230 MB.
    # Bounded to 16 MB of decoded output, it grows by that and the fixed cost of a first
    # fallback (threads, allocator heaps, responses): ~60 MB.
    grown = peak_rss(api) - before
    assert grown < 150 * MB, f"the server's peak memory grew {grown / MB:.0f} MB"
