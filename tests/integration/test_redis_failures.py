"""Redis as production runs it: stopped mid-export, AUTH, TLS, and workers exporting.

Each test starts its own redis-server. The mid-export test gives it an
append-only file so that what was acknowledged (the live version) survives the
stop and restart, as a production Redis with persistence would.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from kv_export.connect import StoreTarget
from kv_export.encoding import bucket_count, encode_keys, unpack_value
from kv_export.errors import StoreUnavailable
from kv_export.export import export_parts, export_parts_on_dask
from kv_export.interface import PredictionStore
from kv_export.redis_reader import RedisReader
from kv_export.redis_store import RedisStore
from kv_export.state import NewVersion
from kv_export.store import open_store
from tests.conftest import RedisServer as Server
from tests.conftest import free_port

pytestmark = pytest.mark.redis
ROWS = 12_000


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def write_parts(folder: Path, value: float, parts: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, keys in enumerate(np.array_split(np.arange(ROWS, dtype=np.int64), parts)):
        path = folder / f"part-{i}.parquet"
        pq.write_table(pa.table({"k": keys, "p": np.full(len(keys), value, np.float32)}), path)
        paths.append(path)
    return paths


def new(run: str) -> NewVersion:
    return NewVersion(
        run_id=run, expected_keys=ROWS, buckets=bucket_count(ROWS), outputs=["p"],
        model_name="m", model_version=run, scored_at="2026-11-23T00:00:00+00:00",
        key_column="k", key_type="int",
    )  # fmt: skip


def served(store: PredictionStore, keys: list[int]) -> set[float]:
    info = store.state("ns").live_info()
    assert info is not None
    found = store.get_many("ns", info, encode_keys(keys))
    assert all(found), "a key of the live version is missing"
    return {unpack_value(v, ["p"])["p"] for v in found if v}


def lookup_reads(url: str, keys: list[int], password: str | None = None) -> set[float]:
    """What the lookup API's reader (its own RESP connection, not redis-py's) reads for
    ``keys`` of the live version, one key at a time and as one batch."""

    async def reads() -> set[float]:
        reader = RedisReader(url, timeout_seconds=2, password=password)
        try:
            info = (await reader.state("ns")).live_info()
            assert info is not None
            raw = encode_keys(keys)
            one = [await reader.get_one("ns", info, k) for k in raw]
            assert one == await reader.get_many("ns", info, raw)
        finally:
            await reader.close()
        assert all(one), "a key of the live version is missing"
        return {unpack_value(v, ["p"])["p"] for v in one if v}

    return asyncio.run(reads())


def test_redis_stopped_mid_export_fails_clearly_and_the_retry_publishes_once(
    tmp_path: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = Server(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    servers.append(server)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    store = open_store(url, timeout_seconds=2)
    first = export_parts(store, "ns", new("run-1"), write_parts(tmp_path / "v1", 1.0))
    store.publish("ns", first.info.version, keep=2)

    real_write = RedisStore.write_columns
    writes = 0

    def write_then_stop(self: RedisStore, *args: object) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            server.stop()  # Redis goes away between two writes of the export
        real_write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(RedisStore, "write_columns", write_then_stop)
    parts = write_parts(tmp_path / "v2", 2.0)
    with pytest.raises(StoreUnavailable) as failed:
        export_parts(store, "ns", new("run-2"), parts, flush_rows=3000, writers=1)
    assert f"Redis at redis://127.0.0.1:{server.port}/0 did not answer" in str(failed.value)
    assert "loading version 2 of 'ns'" in str(failed.value)
    monkeypatch.setattr(RedisStore, "write_columns", real_write)

    server.start()
    state = store.state("ns")
    assert state.live == first.info.version and state.versions[2].state == "loading"
    assert served(store, [0, 5000, ROWS - 1]) == {1.0}  # still the old version, whole

    retried = export_parts(store, "ns", new("run-2"), parts, flush_rows=3000)
    assert retried.info.version == 2 and retried.keys == ROWS and not retried.reused
    store.publish("ns", 2, keep=2)
    store.publish("ns", 2, keep=2)  # a retried publish task changes nothing
    again = export_parts(store, "ns", new("run-2"), parts)
    assert again.reused and again.info.version == 2
    state = store.state("ns")
    assert state.live == 2 and state.history == [1, 2] and sorted(state.versions) == [1, 2]
    assert served(store, list(range(0, ROWS, 7))) == {2.0}


def test_auth_password_from_the_url_or_the_setting(tmp_path: Path, servers: list[Server]) -> None:
    server = Server(tmp_path, "--requirepass", "s3cret")
    servers.append(server)
    server.start(password="s3cret")
    plain = f"redis://127.0.0.1:{server.port}/0"
    with pytest.raises(StoreUnavailable) as refused:
        open_store(plain).state("ns")
    assert "password" in str(refused.value)
    wrong = open_store(plain.replace("redis://", "redis://:wrong@"))
    with pytest.raises(StoreUnavailable) as bad:
        wrong.state("ns")
    assert "wrong" not in str(bad.value) and ":***@" in str(bad.value)
    for store in (
        open_store(plain.replace("redis://", "redis://:s3cret@")),
        open_store(plain, password="s3cret"),
    ):
        result = export_parts(store, "ns", new("r1"), write_parts(tmp_path / "d", 1.0))
        store.publish("ns", result.info.version, keep=2)
        assert served(store, [0, ROWS - 1]) == {1.0}
    assert lookup_reads(plain.replace("redis://", "redis://:s3cret@"), [0, ROWS - 1]) == {1.0}
    assert lookup_reads(plain, [0, ROWS - 1], password="s3cret") == {1.0}
    for url, password in ((plain, None), (plain.replace("redis://", "redis://:wrong@"), "s3cret")):
        with pytest.raises(StoreUnavailable) as failed:  # the URL's (wrong) password wins
            lookup_reads(url, [0], password=password)
        assert "wrong" not in str(failed.value) and "ResponseError" in str(failed.value)


def test_the_lookup_reader_selects_the_database_names_itself_and_reads_over_a_unix_socket(
    tmp_path: Path, servers: list[Server]
) -> None:
    socket = tmp_path / "redis.sock"
    server = Server(tmp_path, "--unixsocket", str(socket), "--unixsocketperm", "700")
    servers.append(server)
    server.start()
    store = open_store(f"redis://127.0.0.1:{server.port}/3")
    result = export_parts(store, "ns", new("r1"), write_parts(tmp_path / "d", 3.0))
    store.publish("ns", result.info.version, keep=2)
    assert lookup_reads(f"redis://127.0.0.1:{server.port}/3", [0, 5, ROWS - 1]) == {3.0}
    assert lookup_reads(f"unix://{socket}?db=3", [0, 5, ROWS - 1]) == {3.0}
    options = "client_name=lookup-api&max_connections=4"  # a pool's option is ignored
    assert lookup_reads(f"redis://127.0.0.1:{server.port}/3?{options}", [0]) == {3.0}

    async def named() -> list[str]:
        reader = RedisReader(f"redis://127.0.0.1:{server.port}/3?{options}")
        await reader.ping()
        clients = redis.Redis(port=server.port).client_list()
        await reader.close()
        return [c["name"] for c in clients]

    assert "lookup-api" in asyncio.run(named())
    with pytest.raises(AssertionError):  # database 0 holds no live version
        lookup_reads(f"redis://127.0.0.1:{server.port}/0", [0])


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_with_rediss_and_a_private_ca(tmp_path: Path, servers: list[Server]) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run `make system-deps`, which installs it")
    cert, key = make_certificate(tmp_path)
    port = free_port()
    server = Server(
        tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--requirepass", "s3cret", port=port,
    )  # fmt: skip
    servers.append(server)
    server.start(ssl=True, ssl_ca_certs=str(cert), password="s3cret")
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    store = open_store(url)
    result = export_parts(store, "ns", new("r1"), write_parts(tmp_path / "d", 1.0))
    store.publish("ns", result.info.version, keep=2)
    assert served(store, list(range(0, ROWS, 11))) == {1.0}
    assert lookup_reads(url, list(range(0, ROWS, 11))) == {1.0}
    with pytest.raises(StoreUnavailable):  # plain text to a TLS port is refused
        open_store(f"redis://:s3cret@127.0.0.1:{port}/0", timeout_seconds=1).state("ns")


def test_dask_workers_export_their_own_parts(tmp_path: Path, servers: list[Server]) -> None:
    from distributed import Client, LocalCluster

    server = Server(tmp_path)
    servers.append(server)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    parts = write_parts(tmp_path / "d", 3.0, parts=6)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        result = export_parts_on_dask(client, StoreTarget(url), "ns", new("r1"), parts)
        workers = {str(w["name"]) for w in client.scheduler_info()["workers"].values()}
    assert result.keys == ROWS and not result.reused
    assert result.loaded_on and set(result.loaded_on) <= workers, (result.loaded_on, workers)
    store = open_store(url)
    store.publish("ns", result.info.version, keep=2)
    assert served(store, list(range(ROWS))) == {3.0}
