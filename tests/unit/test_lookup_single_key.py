"""The single-key lookup: the answers of ``get_many`` and the breaker's accounting of
``StoreBreaker.call``, on the embedded store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from batchscore.core.settings import ApiSettings
from kv_export.errors import StoreUnavailable
from kv_export.lmdb_store import LmdbReader, LmdbStore
from kv_export.store import VersionInfo
from lookup.errors import ApiError
from lookup.observability import Metrics
from lookup.service import Lookup
from tests.conftest import load_version

KEYS = 100


def published(path: Path) -> LmdbStore:
    store = LmdbStore(path)
    values = np.arange(KEYS, dtype=np.float32).reshape(KEYS, 1)
    store.publish("ns", load_version(store, "r1", values), keep=2)
    return store


class FlakyReader(LmdbReader):
    """The embedded reader, with single-key reads failing while ``failing`` is set."""

    failing = False

    async def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> bytes | None:
        if self.failing:
            raise StoreUnavailable("store down for the test")
        return await super().get_one(namespace, info, key)


def test_get_one_answers_as_get_many(tmp_path: Path) -> None:
    store = published(tmp_path / "store")
    info = store.state("ns").live_info()
    assert info is not None
    for key in (b"0", b"7", b"99", b"100", b"absent"):
        assert store.get_one("ns", info, key) == store.get_many("ns", info, [key])[0]
    assert store.get_one("ns", info, b"7") is not None
    expired = info.model_copy(update={"expires_at": "2000-01-01T00:00:00+00:00"})
    assert store.get_one("ns", expired, b"7") is None


def test_single_key_failures_open_the_breaker_and_a_success_resets_the_count(
    tmp_path: Path,
) -> None:
    published(tmp_path / "store")
    settings = ApiSettings(
        home=tmp_path, batch_fallback=False, breaker_failures=2, breaker_reset_seconds=60
    )
    reader = FlakyReader(tmp_path / "store")
    lookup = Lookup(settings, reader, Metrics())

    async def scenario() -> None:
        await lookup.warm()
        info, source, answer = await lookup.find_one("ns", "7")
        assert answer is not None and source == "kv" and info.version == answer.info.version

        reader.failing = True
        with pytest.raises(ApiError) as failed:
            await lookup.find_one("ns", "7")
        assert failed.value.status == 503
        assert lookup.breaker.state == "closed" and lookup.breaker.recovering()

        reader.failing = False  # a success in between: the count starts again
        assert (await lookup.find_one("ns", "7"))[2] is not None
        assert not lookup.breaker.recovering()

        reader.failing = True
        for _ in range(2):
            with pytest.raises(ApiError):
                await lookup.find_one("ns", "7")
        assert lookup.breaker.state == "opened"
        reader.failing = False  # open: refused without a store call until a probe closes it
        with pytest.raises(ApiError):
            await lookup.find_one("ns", "7")

    asyncio.run(scenario())
