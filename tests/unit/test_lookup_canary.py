"""The lookup's chain during a canary, on the embedded store: each key from the version the
rule gives it, and the stale fallback from the version before that one (the live version
for a canary key, the previous published version for a live key)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from batchscore.core.settings import ApiSettings
from kv_export.encoding import canary_slot, encode_keys, pack_values
from kv_export.lmdb_store import LmdbReader, LmdbStore
from lookup.observability import Metrics
from lookup.service import Answer, Lookup, Miss
from tests.conftest import new_version


def load(store: LmdbStore, run: str, keys: list[int], value: float) -> int:
    info = store.begin_version("ns", new_version(run, len(keys)))
    values = np.full((len(keys), 1), value, dtype=np.float32)
    store.write("ns", info, encode_keys(keys), pack_values(values))
    return store.complete_version("ns", info.version, len(keys)).version


def in_canary(key: int) -> bool:
    return canary_slot(str(key).encode()) < 5000


def test_the_stale_fallback_keeps_to_the_rule(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "store")
    previous = load(store, "p", list(range(3000)), 1.0)
    store.publish("ns", previous, keep=3)
    live = load(store, "a", list(range(1000)), 2.0)  # lacks 1000..2999
    store.publish("ns", live, keep=3)
    canary = load(store, "b", list(range(500)), 3.0)  # lacks 500..2999
    store.start_canary("ns", canary, 50)
    lookup = Lookup(
        ApiSettings(home=tmp_path / "home", stale_fallback=True),
        LmdbReader(tmp_path / "store"),
        Metrics(),
    )
    keys = [k for k in range(0, 3000, 7)] + [9999, 9998]

    async def both() -> tuple[list[Answer | Miss], list[Answer | None]]:
        _, answers = await lookup.find("ns", [str(k) for k in keys])
        singles = [(await lookup.find_one("ns", str(k)))[2] for k in keys]
        return answers, singles

    answers, singles = asyncio.run(both())
    for key, answer, single in zip(keys, answers, singles, strict=True):
        canary_key = in_canary(key)
        if canary_key:  # the canary, then the live version before it; never the previous
            expected = (canary, False) if key < 500 else (live, True) if key < 1000 else None
        else:
            expected = (live, False) if key < 1000 else (previous, True) if key < 3000 else None
        if expected is None:  # a miss, in the version the rule gives the key
            assert isinstance(answer, Miss) and single is None, key
            assert answer.canary is canary_key
            assert answer.info.version == (canary if canary_key else live)
            continue
        assert isinstance(answer, Answer) and single is not None, key
        got = (answer.info.version, answer.stale, answer.canary)
        assert got == (single.info.version, single.stale, single.canary) == (*expected, canary_key)
