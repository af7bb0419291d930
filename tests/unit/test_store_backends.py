"""One scheme table: the pipeline's store and the lookup API's reader of a URL are the same
backend, and a URL that one refuses the other refuses with the same message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kv_export.backends import BACKENDS
from kv_export.connect import StoreTarget
from kv_export.errors import BadStoreUrl
from kv_export.lmdb_store import LmdbReader, LmdbStore
from kv_export.redis_reader import RedisReader
from kv_export.redis_store import RedisStore
from kv_export.store import open_store
from lookup.readers import open_reader


def test_an_embedded_store_and_its_reader_open_the_same_folder(tmp_path: Path) -> None:
    for url in (f"lmdb://{tmp_path / 'a'}", str(tmp_path / "b")):
        store = open_store(url)
        reader = open_reader(StoreTarget(url))
        assert isinstance(store, LmdbStore) and isinstance(reader, LmdbReader)
        assert reader.url == store.url
        assert asyncio.run(reader.namespaces()) == store.namespaces() == []


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///nowhere.sock"]
)
def test_a_redis_url_opens_the_redis_store_and_reader(url: str) -> None:
    """Neither connects before its first call, so no server is needed to tell them apart."""
    assert isinstance(open_store(url, timeout_seconds=0.1), RedisStore)
    reader = open_reader(StoreTarget(url, timeout_seconds=0.1))
    assert isinstance(reader, RedisReader) and reader.url == url


@pytest.mark.parametrize("url", ["memcached://:secret@h:1", "lmdb://", "http://h/x"])
def test_both_factories_refuse_a_url_alike_without_its_password(url: str) -> None:
    with pytest.raises(BadStoreUrl) as by_store:
        open_store(url)
    with pytest.raises(BadStoreUrl) as by_reader:
        open_reader(StoreTarget(url))
    assert str(by_store.value) == str(by_reader.value)
    assert "secret" not in str(by_store.value)


def test_the_refusal_names_every_backend() -> None:
    with pytest.raises(BadStoreUrl) as refused:
        open_store("memcached://h")
    for backend in BACKENDS.values():
        assert backend.example in str(refused.value)
