"""batchscore.testing's launchers, which the tests, the benchmarks and the demo rely on:
a real redis-server that keeps its port across restarts (and its data, with an AOF), and
waits that fail at once, with the log, when the started process dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from batchscore.testing import (
    RedisServer,
    ServiceExited,
    ServiceTimeout,
    free_port,
    wait_for_http,
)

pytestmark = pytest.mark.redis


def test_an_aof_server_comes_back_from_a_kill_with_its_data_on_the_same_url(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        url = server.url
        with server.client() as client:
            client.set("k", "v")
        server.kill()  # no shutdown: only what the AOF holds survives
        server.start()
        assert server.url == url
        with redis.Redis.from_url(url) as client:
            assert client.get("k") == b"v"
    finally:
        server.stop()


def test_a_default_server_keeps_nothing_across_stop_and_start(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        with server.client() as client:
            client.set("k", "v")
        server.stop()
        server.start()
        with server.client() as client:
            assert client.get("k") is None


def test_a_password_server_answers_the_client_it_was_started_for(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    server.start(password="s3cret")
    try:
        with server.client() as client:
            assert client.ping()
        with redis.Redis(port=server.port) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.get("k")
    finally:
        server.stop()


def test_a_server_that_refuses_its_arguments_fails_at_once_with_its_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--no-such-directive", "yes")
    started = time.monotonic()
    with pytest.raises(ServiceExited) as failed:
        server.start(seconds=30)
    assert time.monotonic() - started < 10, "the wait did not notice the exit"
    assert failed.value.returncode != 0
    assert "no-such-directive" in str(failed.value)  # redis-server's own complaint


def test_waiting_for_http_fails_at_once_when_the_process_exits(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"], stdout=handle
        )
    with pytest.raises(ServiceExited) as failed:
        wait_for_http(
            f"http://127.0.0.1:{free_port()}/healthz", seconds=30, process=process, log=log
        )
    assert failed.value.returncode == 3
    assert "cannot bind" in str(failed.value)


def test_waiting_for_http_with_nothing_listening_times_out_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    with pytest.raises(ServiceTimeout, match="did not answer within 1 s") as failed:
        wait_for_http(url, seconds=1)
    assert failed.value.what == url
