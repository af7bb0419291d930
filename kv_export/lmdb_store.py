"""The embedded store: LMDB, no server.

Why LMDB: readers never block and never see a half-written transaction (MVCC),
a point read is a B-tree lookup in a memory map (no server, no round trip, no lock),
several processes (the CLI exporting, the API serving) share one store safely through
its lock file, and one version's keys are one contiguous, ordered key range, so
deleting a version is a range delete.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kv_export.base import StateBackedStore
from kv_export.encoding import lmdb_key, lmdb_version_prefix, pack_values
from kv_export.errors import StoreUnavailable
from kv_export.state import NamespaceState, VersionInfo

T = TypeVar("T")

MAP_SIZE = 1 << 40  # address space only; the file grows with the data
DELETE_CHUNK = 100_000

_envs: dict[Path, lmdb.Environment] = {}
_envs_lock = threading.Lock()


def _environment(path: Path) -> lmdb.Environment:
    """LMDB allows one open environment per path per process: share it."""
    with _envs_lock:
        env = _envs.get(path)
        if env is None:
            path.mkdir(parents=True, exist_ok=True)
            try:
                env = lmdb.open(
                    str(path), map_size=MAP_SIZE, max_dbs=4, readahead=False, max_readers=512
                )
            except lmdb.Error as exc:
                raise StoreUnavailable(
                    f"Cannot open the embedded store at {path}",
                    found=str(exc),
                    fix="Check the folder exists and is writable, or set BATCHSCORE_STORE_URL",
                ) from exc
            _envs[path] = env
        return env


_read_only_envs: dict[Path, lmdb.Environment] = {}


def _read_only_environment(path: Path) -> lmdb.Environment:
    """The lookup API's environment: the process's own writable one if it writes the store
    too (LMDB allows one environment per path per process), otherwise the store opened
    read-only. A folder without a store is an error naming it, and nothing is created."""
    with _envs_lock:
        env = _envs.get(path) or _read_only_envs.get(path)
        if env is not None:
            return env
        if not (path / "data.mdb").is_file():
            raise StoreUnavailable(
                f"There is no embedded store at {path}",
                expected="the folder of an LMDB store a run exported to (holding data.mdb)",
                fix="Check BATCHSCORE_STORE_URL (or --store): the API never creates a store",
            )
        try:
            env = lmdb.open(
                str(path),
                readonly=True,
                create=False,
                map_size=MAP_SIZE,
                max_dbs=4,
                readahead=False,
                max_readers=512,
            )
        except lmdb.Error as exc:
            raise StoreUnavailable(
                f"Cannot open the embedded store at {path} read-only",
                found=str(exc),
                fix="Check the folder and its lock.mdb are readable and lock.mdb is writable",
            ) from exc
        _read_only_envs[path] = env
        return env


class LmdbStore(StateBackedStore):
    """TTL: readers treat a version past ``expires_at`` as empty, as Redis does; the
    bytes stay on disk until ``gc`` (or a publish beyond ``keep``) deletes the version.
    """

    parallel_writers = 1  # one LMDB writer at a time; more threads would only queue

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = f"lmdb://{self.path}"
        self._env = _environment(self.path)
        self._state_db = self._env.open_db(b"state")
        self._data_db = self._env.open_db(b"data")

    @classmethod
    def read_only(cls, path: str | Path) -> LmdbStore:
        """The store as the lookup API opens it: read-only, and only if it exists."""
        store = cls.__new__(cls)
        store.path = Path(path).expanduser().absolute()
        store.url = f"lmdb://{store.path}"
        store._env = _read_only_environment(store.path)
        try:
            store._state_db = store._env.open_db(b"state", create=False)
            store._data_db = store._env.open_db(b"data", create=False)
        except lmdb.Error as exc:
            raise StoreUnavailable(
                f"The LMDB environment at {store.path} is not a batchscore store",
                expected="the 'state' and 'data' databases a run's export creates",
                found=type(exc).__name__,
                fix="Check BATCHSCORE_STORE_URL (or --store)",
            ) from exc
        return store

    def _read(self, namespace: str) -> NamespaceState:
        with self._env.begin(db=self._state_db) as txn:
            raw = txn.get(namespace.encode())
        return NamespaceState.model_validate_json(raw) if raw else NamespaceState()

    def _update(
        self, namespace: str, change: Callable[[NamespaceState], tuple[NamespaceState, T]]
    ) -> T:
        with self._env.begin(write=True, db=self._state_db) as txn:
            raw = txn.get(namespace.encode())
            state = NamespaceState.model_validate_json(raw) if raw else NamespaceState()
            new, result = change(state)
            if new is not state:
                txn.put(namespace.encode(), new.model_dump_json().encode())
        return result

    def namespaces(self) -> list[str]:
        with self._env.begin(db=self._state_db) as txn:
            return sorted(k.decode() for k, _ in txn.cursor())

    def write(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None:
        prefix = lmdb_version_prefix(namespace, info.version)
        with self._env.begin(write=True, db=self._data_db) as txn:
            txn.cursor().putmulti(zip([prefix + k for k in keys], values, strict=True))

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        """One write transaction per call."""
        with self._env.begin(write=True, db=self._data_db) as txn:
            _put(txn.cursor(), lmdb_version_prefix(namespace, info.version), keys, values)

    def write_all(
        self,
        namespace: str,
        info: VersionInfo,
        flushes: Iterable[tuple[pa.BinaryArray, np.ndarray]],
    ) -> int:
        """A whole version's load (``kv_export.export.load_parts``) in one write
        transaction; returns its rows. Its keys come from parts in any order, so each
        transaction of a load made of many touched most of the B-tree's pages and copied
        them again (copy-on-write): 20M keys of the bench's parts took 30.9 s and left a
        2.5 GB file; in one transaction, each flush's keys put in byte order, 14.6 s and
        0.95 GB. Other writers of the store wait for it meanwhile; readers never do. A load
        that fails writes nothing."""
        prefix = lmdb_version_prefix(namespace, info.version)
        rows = 0
        with self._env.begin(write=True, db=self._data_db) as txn:
            cursor = txn.cursor()
            for keys, values in flushes:
                _put(cursor, prefix, keys, values)
                rows += len(keys)
        return rows

    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        if info.expired():
            return [None] * len(keys)
        with self._env.begin(db=self._data_db, buffers=False) as txn:
            return [txn.get(lmdb_key(namespace, info.version, k)) for k in keys]

    def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> bytes | None:
        """``get_many`` of one key without the lists: the lookup API's single-key read."""
        if info.expires_at is not None and info.expired():
            return None
        with self._env.begin(db=self._data_db) as txn:
            return txn.get(lmdb_key(namespace, info.version, key))

    def delete_version_data(self, namespace: str, info: VersionInfo) -> None:
        prefix = lmdb_version_prefix(namespace, info.version)
        while True:
            with self._env.begin(write=True, db=self._data_db) as txn:
                cursor = txn.cursor()
                deleted = 0
                if cursor.set_range(prefix):
                    while cursor.key().startswith(prefix) and deleted < DELETE_CHUNK:
                        cursor.delete()
                        deleted += 1
                        if not cursor.key():
                            break
            if deleted < DELETE_CHUNK:
                return

    def ping(self) -> None:
        self._env.stat()

    def close(self) -> None:
        """Environments are shared per process and closed at exit."""


def _put(cursor: lmdb.Cursor, prefix: bytes, keys: pa.BinaryArray, values: np.ndarray) -> None:
    """Put ``keys`` (under ``prefix``) and their values in the keys' byte order, the
    B-tree's: each put lands on or next to the page of the one before. Full keys are
    built by Arrow, not per key."""
    order = pc.sort_indices(keys)
    full = pc.binary_join_element_wise(prefix, keys.take(order), b"").to_pylist()
    cursor.putmulti(zip(full, pack_values(values[order.to_numpy()]), strict=True))


@lru_cache(maxsize=4096)
def _version_prefix(namespace: str, version: int) -> bytes:
    """``lmdb_version_prefix``, kept for the versions being read."""
    return lmdb_version_prefix(namespace, version)


class LmdbReader:
    """The async read interface over an ``LmdbStore`` opened read-only (``read_only``): the
    API never writes the store, and a mistyped path fails at start instead of serving an
    empty store it created.

    An LMDB point read is a lookup in the memory-mapped B-tree and never blocks on
    writers (MVCC), so it runs directly on the event loop: handing it to a thread would
    cost more than the read itself. An LMDB error is the store's failure
    (``StoreUnavailable``, counted by the breaker).
    """

    def __init__(self, path: str | Path) -> None:
        self._store = LmdbStore.read_only(path)
        self.url = self._store.url
        self._env, self._data_db = self._store._env, self._store._data_db  # for get_one

    def _unavailable(self, exc: lmdb.Error) -> StoreUnavailable:
        return StoreUnavailable(
            f"Cannot read the embedded store at {self._store.path}", found=type(exc).__name__
        )

    async def state(self, namespace: str) -> NamespaceState:
        try:
            return self._store.state(namespace)
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    async def namespaces(self) -> list[str]:
        try:
            return self._store.namespaces()
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]:
        try:
            return self._store.get_many(namespace, info, keys)
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    async def get_one(self, namespace: str, info: VersionInfo, key: bytes) -> bytes | None:
        """``kv_export.interface.SingleKeyReader``'s read: one coroutine that never suspends, the
        cheapest awaitable for a value that is there at once (cheaper than a done future),
        and a lookup skips ``get_many``'s lists and the wrapper coroutine of
        ``lookup.readers.single_key_read``. The read of ``LmdbStore.get_one`` done here
        directly, with the version's key prefix built once per version, not per lookup."""
        if info.expires_at is not None and info.expired():
            return None
        try:
            with self._env.begin(db=self._data_db) as txn:
                return txn.get(_version_prefix(namespace, info.version) + key)  # type: ignore[no-any-return]
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    async def ping(self) -> None:
        try:
            self._store.ping()
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    async def close(self) -> None:
        self._store.close()
