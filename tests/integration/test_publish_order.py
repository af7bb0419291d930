"""Issue 16 items 12-14 against real stores (LMDB and a real redis-server).

Versions go live in order (DESIGN invariant 9): by the date their data is as of (a
DAG run's logical date, a CLI run's creation), then by number. An older run never
replaces a newer live version unless forced; a rollback pins the namespace against
older runs; an expired version never goes live; garbage is collected after publishes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from kv_export.encoding import encode_keys, pack_values
from kv_export.errors import VersionExpired, VersionOutOfOrder
from kv_export.interface import PredictionStore
from kv_export.store import open_store
from tests.conftest import KEY, RedisServer, new_version, run_cli, wait_past

KEYS = 2_000
D1, D2, D3 = "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00", "2026-11-03T00:00:00+00:00"

Opener = Callable[[], PredictionStore]


@pytest.fixture(params=["lmdb", pytest.param("redis", marks=pytest.mark.redis)])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a new client of one store: each racing thread gets its own connection."""
    if request.param == "lmdb":
        url = f"lmdb://{tmp_path / 'store'}"
    else:
        server = RedisServer(tmp_path)
        server.start()
        request.addfinalizer(server.stop)
        url = server.url
    opened: list[PredictionStore] = []

    def open_one() -> PredictionStore:
        opened.append(open_store(url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def dated(
    store: PredictionStore, run: str, data_as_of: str, value: float, *, complete: bool = True
) -> int:
    """A loaded version of namespace "ns" whose data is as of ``data_as_of``."""
    new = new_version(run, KEYS).model_copy(update={"data_as_of": data_as_of})
    info = store.begin_version("ns", new)
    store.write("ns", info, encode_keys(range(KEYS)), pack_values(np.full((KEYS, 1), value)))
    if complete:
        store.complete_version("ns", info.version, KEYS)
    return info.version


def live_run(store: PredictionStore) -> str | None:
    info = store.state("ns").live_info()
    return info.run_id if info else None


def race(*calls: Callable[[], object]) -> list[object]:
    """Run the calls at once, one thread each; return each one's result or exception."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the exception is the result
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_runs_publishing_at_once_the_newer_wins_whatever_the_order(opener: Opener) -> None:
    store = opener()
    for attempt in range(6):
        old = dated(store, f"old-{attempt}", f"2026-11-{2 * attempt + 1:02d}T00:00:00+00:00", 1.0)
        new = dated(store, f"new-{attempt}", f"2026-11-{2 * attempt + 2:02d}T00:00:00+00:00", 2.0)
        a, b = opener(), opener()
        publishes = [partial(a.publish, "ns", old, keep=2), partial(b.publish, "ns", new, keep=2)]
        results = race(*(publishes if attempt % 2 else publishes[::-1]))
        assert live_run(store) == f"new-{attempt}"
        refused = [r for r in results if isinstance(r, Exception)]
        assert all(isinstance(r, VersionOutOfOrder) for r in refused), refused


def test_a_late_older_run_is_refused_and_force_publishes_it(opener: Opener) -> None:
    store = opener()
    late = dated(store, "day-1", D1, 1.0)
    newer = dated(store, "day-2", D2, 2.0)
    store.publish("ns", newer, keep=3)
    with pytest.raises(VersionOutOfOrder) as refused:
        store.publish("ns", late, keep=3)
    message = str(refused.value)
    for part in (f"Version {late}", D1, f"version {newer}", D2, "--force"):
        assert part in message
    assert live_run(store) == "day-2"
    store.publish("ns", late, keep=3, force=True)
    assert live_run(store) == "day-1"
    # The operator's choice holds against runs older than day 2; a newer run goes live.
    between = dated(store, "day-1.5", "2026-11-01T12:00:00+00:00", 1.5)
    with pytest.raises(VersionOutOfOrder):
        store.publish("ns", between, keep=3)
    store.publish("ns", dated(store, "day-3", D3, 3.0), keep=3)
    assert live_run(store) == "day-3"


def test_a_rollback_racing_a_publish_ends_in_a_state_the_rule_allows(opener: Opener) -> None:
    store = opener()
    for run, day in (("day-1", D1), ("day-2", D2)):
        store.publish("ns", dated(store, run, day, 1.0), keep=5)
    late = dated(store, "day-1-rerun", "2026-11-01T06:00:00+00:00", 1.2)
    a, b = opener(), opener()
    # An older run never undoes a rollback, whichever comes first.
    results = race(lambda: a.rollback("ns"), lambda: b.publish("ns", late, keep=5))
    assert isinstance(results[1], VersionOutOfOrder)
    assert live_run(store) == "day-1"
    # A newer run and a rollback: the rollback goes back from whatever is live.
    store.publish("ns", dated(store, "day-3", D3, 3.0), keep=5)
    newest = dated(store, "day-4", "2026-11-04T00:00:00+00:00", 4.0)
    results = race(lambda: a.rollback("ns"), lambda: b.publish("ns", newest, keep=5))
    assert not [r for r in results if isinstance(r, Exception)], results
    state = store.state("ns")
    # Rollback first: day 4 published over it. Publish first: rolled back from 4 to 3.
    assert live_run(store) in {"day-4", "day-3"}
    assert state.live == state.history[-1] and state.newest is not None
    assert state.newest.version == newest


def test_expired_versions_are_neither_published_nor_rolled_back_to(opener: Opener) -> None:
    store = opener()
    store.publish("ns", dated(store, "day-1", D1, 1.0), keep=5)
    store.set_ttl("ns", 1)
    v2 = dated(store, "day-2", D2, 2.0)
    store.publish("ns", v2, keep=5)
    v3 = dated(store, "day-3", D3, 3.0)
    expires_at = store.state("ns").versions[v3].expires_at
    assert expires_at is not None
    wait_past(expires_at)  # what follows asserts behaviour, not a duration
    with pytest.raises(VersionExpired, match=f"Version {v3}"):
        store.publish("ns", v3, keep=5)
    store.set_ttl("ns", 0)
    store.publish("ns", dated(store, "day-4", "2026-11-04T00:00:00+00:00", 4.0), keep=5)
    with pytest.raises(VersionExpired, match=f"Version {v2}"):
        store.rollback("ns")
    assert store.rollback("ns", to=1).run_id == "day-1"  # loaded before the TTL


def test_an_orphaned_loading_version_is_collected_after_the_grace_period(opener: Opener) -> None:
    store = opener()
    orphan = dated(store, "crashed", D1, 9.0, complete=False)  # an export that died
    store.publish("ns", dated(store, "day-2", D2, 2.0), keep=2)
    assert store.gc("ns", keep=2, loading_grace_seconds=3600) == []
    assert orphan in store.state("ns").versions
    gone = store.gc("ns", keep=2, loading_grace_seconds=0)
    assert [info.version for info in gone] == [orphan]
    state = store.state("ns")
    assert orphan not in state.versions and state.deleting == {}
    ghost = state.versions[state.live or 0].model_copy(update={"version": orphan})
    assert store.get_many("ns", ghost, encode_keys([0, KEYS - 1])) == [None, None]


def test_a_collection_past_its_budget_leaves_the_rest_for_the_next(opener: Opener) -> None:
    store = opener()
    for day in range(1, 6):
        store.publish("ns", dated(store, f"d{day}", f"2026-11-0{day}T00:00:00+00:00", 1.0), keep=5)
    first = store.gc("ns", keep=1, budget_seconds=0.0)
    assert len(first) == 1 and len(store.state("ns").deleting) == 3
    assert len(store.gc("ns", keep=1)) == 3 and store.state("ns").deleting == {}


def test_the_pipeline_publishes_in_logical_date_order_and_collects_run_folders(
    env: dict[str, str], dataset: Path
) -> None:
    from batchscore.core.settings import RunSettings, load_settings
    from jobs import steps
    from jobs.manifest import load_manifest
    from jobs.pipeline import run_pipeline

    settings = load_settings(RunSettings)

    def params(day: str) -> object:
        return steps.make_params(
            settings,
            input_path=str(dataset),
            model_uri="models:/churn/1",
            key_column=KEY,
            namespace="ordered",
            data_as_of=day,
        )

    newer = run_pipeline(settings, params(D2), run_id="daily__2026-11-02")
    assert newer.published
    stale = Path(newer.run_dir).parent / "daily__2026-10-01"  # a run nothing keeps
    (stale / "parts").mkdir(parents=True)
    long_ago = time.time() - 3 * 86400
    os.utime(stale, (long_ago, long_ago))
    os.utime(newer.run_dir, (long_ago, long_ago))  # old, but its version is live: kept
    with pytest.raises(VersionOutOfOrder, match="daily__2026-11-01.*--force"):
        run_pipeline(settings, params(D1), run_id="daily__2026-11-01")
    late = load_manifest(Path(newer.run_dir).parent / "daily__2026-11-01")
    assert not late.published
    store = open_store(settings.resolved_store_url)
    assert store.state("ordered").live == newer.version

    keep_one_day = env | {"BATCHSCORE_KEEP_RUN_DAYS": "1"}
    done = run_cli("step", "publish", late.run_dir, "--force", env=keep_one_day)
    assert done.returncode == 0, done.stderr
    assert store.state("ordered").live_info().run_id == "daily__2026-11-01"
    published = load_manifest(late.run_dir).steps["publish"]
    assert published["forced"] is True
    assert published["collected_run_folders"] == [str(stale)]
    assert not stale.exists() and Path(newer.run_dir, "parts").exists()
