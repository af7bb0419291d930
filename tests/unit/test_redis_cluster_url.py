"""``redis+cluster://`` URLs, the backend table's entry for them, and the reader's reading
of a cluster's redirections (pure: no server)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from batchscore.core.urls import public_url, split_password
from kv_export.backends import backend_for
from kv_export.encoding import ENCODING, redis_bucket_groups
from kv_export.errors import BadStoreUrl
from kv_export.interface import redact_url
from kv_export.redis_cluster import first_key
from kv_export.redis_cluster_reader import bucket_slot, node_lost, redirection
from kv_export.redis_cluster_url import cluster_address


def test_seeds_credentials_and_options_reach_every_node() -> None:
    address = cluster_address("rediss+cluster://app:pw@10.0.0.1:7000,[::1]:7001/?ssl_ca_certs=/ca")
    assert address.seeds == (("10.0.0.1", 7000), ("::1", 7001))
    assert address.node_url("10.0.0.2", 7005) == "rediss://app:pw@10.0.0.2:7005/0?ssl_ca_certs=/ca"
    assert address.node_url("::1", 7001) == "rediss://app:pw@[::1]:7001/0?ssl_ca_certs=/ca"
    plain = cluster_address("redis+cluster://127.0.0.1:7000")
    assert plain.seeds == (("127.0.0.1", 7000),)
    assert plain.node_url("127.0.0.1", 7000) == "redis://127.0.0.1:7000/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://:pw@host,other:7000/", "'host' that is not host:port"),
        ("redis+cluster://:pw@host:70000/", "'host:70000' that is not host:port"),
        ("redis+cluster://:pw@host:7000/1", "database '1'"),
    ],
)
def test_a_bad_cluster_url_is_named_without_its_password(url: str, says: str) -> None:
    with pytest.raises(BadStoreUrl) as refused:
        cluster_address(url)
    assert says in str(refused.value) and "pw" not in str(refused.value)
    assert redact_url(url) in str(refused.value)


def test_the_backend_table_and_the_url_helpers_know_cluster_urls() -> None:
    url = "redis+cluster://:pw@h1:7000,h2:7001/"
    assert backend_for(url).name == backend_for("rediss+cluster://h:1").name == "redis-cluster"
    assert redact_url(url) == "redis+cluster://:***@h1:7000,h2:7001/"
    assert public_url(url) == "redis+cluster://h1:7000,h2:7001/"
    assert split_password(url) == ("redis+cluster://h1:7000,h2:7001/", "pw")
    with pytest.raises(BadStoreUrl) as unknown:
        backend_for("memcached://h:1")
    assert "redis+cluster://" in str(unknown.value)


def test_redirections_and_lost_nodes_are_told_apart() -> None:
    assert redirection(ResponseError("MOVED 3999 127.0.0.1:6381")) == (
        False,
        3999,
        "127.0.0.1",
        6381,
    )
    assert redirection(ResponseError("ASK 12 ::1:7000")) == (True, 12, "::1", 7000)
    assert redirection(ResponseError("WRONGTYPE Operation")) is None
    assert redirection(RedisConnectionError("gone")) is None
    assert node_lost(RedisConnectionError("gone")) and node_lost(ConnectionRefusedError())
    assert node_lost(ResponseError("CLUSTERDOWN The cluster is down"))
    assert not node_lost(ResponseError("MOVED 1 h:1"))


def test_a_bucket_group_is_one_slot_and_a_chunk_names_its_first_key() -> None:
    groups = redis_bucket_groups("churn", 4, 3000, ENCODING)
    for group in groups:
        assert len({bucket_slot("churn", 4, int(k.rsplit(b":b", 1)[1]), ENCODING)
                    for k in group}) == 1  # fmt: skip
    name = b"bs:{churn:v4:g0}:b17"
    payload = b"*4\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$1\r\nk\r\n$1\r\nv\r\n" % (len(name), name)
    assert first_key(memoryview(payload)) == name


def test_a_load_split_by_group_is_the_same_commands_one_slot_a_chunk() -> None:
    import numpy as np
    import pyarrow as pa

    from kv_export.encoding import bucket_count, redis_hset_payload, text_keys
    from kv_export.redis_cluster_reader import key_slot

    rows = 150_000
    keys = text_keys(pa.array(np.arange(rows)))
    values = np.arange(rows, dtype=np.float32).reshape(-1, 1)
    buckets = bucket_count(rows)
    whole = redis_hset_payload("ns", 2, buckets, keys, values, chunk_commands=700)
    split = redis_hset_payload(
        "ns", 2, buckets, keys, values, chunk_commands=700, split_groups=True
    )
    assert b"".join(bytes(p) for p, _ in split) == b"".join(bytes(p) for p, _ in whole)
    assert sum(n for _, n in split) == sum(n for _, n in whole) == buckets
    assert len(split) > len(whole) and all(n <= 700 for _, n in split)
    for payload, commands in split:
        names = [line for line in bytes(payload).split(b"\r\n") if line.startswith(b"bs:{")]
        assert len(names) == commands and len({key_slot(n) for n in names}) == 1


def test_a_job_config_takes_every_store_url_scheme_the_backends_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DAG's job config checks store URLs without importing the store modules (DAG
    files stay light), so it keeps its own list of schemes: it must not fall behind."""
    from pathlib import Path

    from kv_export.backends import BACKENDS

    # batchscore_dags imported as Airflow imports it: from the DAGs folder on sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "dags"))
    from batchscore_dags.config import STORE_SCHEMES

    assert {scheme for scheme in BACKENDS if scheme} <= set(STORE_SCHEMES)
