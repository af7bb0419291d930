"""The KV store interface, the namespace bookkeeping every store shares, and ``open_store``.

A namespace's bookkeeping (live pointer, publish history, version records,
run → version map) is one ``NamespaceState`` document. Stores keep it under one
key and change it only inside one atomic read-modify-write (an LMDB write
transaction, a Redis WATCH/MULTI), so publishing is one atomic step and a
reader that reads the state once sees one consistent live version.

``NamespaceState``'s methods are pure: they take the state and return a new one,
and the stores carry out the result (write keys, delete old versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from kv_export.encoding import ENCODING
from kv_export.errors import (
    AlreadyPublished,
    BadStoreUrl,
    StoreError,
    VersionIncomplete,
    VersionNotFound,
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _later(stamp: str, seconds: int) -> str:
    return (datetime.fromisoformat(stamp) + timedelta(seconds=seconds)).isoformat(
        timespec="seconds"
    )


class PartInfo(BaseModel):
    """One output part of the run: where it is and which keys it holds."""

    path: str
    rows: int
    min_key: str | int | None = None
    max_key: str | int | None = None


class VersionInfo(BaseModel):
    """What a version is: written once at export, read by the lookup API."""

    version: int
    run_id: str
    state: Literal["loading", "complete"] = "loading"
    created_at: str = Field(default_factory=utcnow)
    completed_at: str | None = None
    published_at: str | None = None
    expected_keys: int = 0
    key_count: int = 0
    buckets: int = 1
    encoding: int = ENCODING  # the layout it was written in; readers follow it
    outputs: list[str]
    model_name: str
    model_version: str
    scored_at: str
    key_column: str
    key_type: Literal["int", "string"] = "string"
    output_dir: str | None = None
    parts: list[PartInfo] = Field(default_factory=list)
    expires_at: str | None = None  # set at completion when the namespace has a TTL

    def expired(self, now: datetime | None = None) -> bool:
        """Past its TTL: every store then answers lookups in it as not found."""
        if self.expires_at is None:
            return False
        return (now or datetime.now(UTC)) >= datetime.fromisoformat(self.expires_at)


class NewVersion(BaseModel):
    """What the exporter knows about a version before it is allocated a number."""

    run_id: str
    expected_keys: int
    buckets: int = 1
    outputs: list[str]
    model_name: str
    model_version: str
    scored_at: str
    key_column: str
    key_type: Literal["int", "string"] = "string"
    output_dir: str | None = None
    parts: list[PartInfo] = Field(default_factory=list)


class NamespaceState(BaseModel):
    """One namespace's bookkeeping; every change is a pure method returning a new state.

    Invariants: ``live`` is in ``versions`` and is ``history[-1]``; a version in
    ``deleting`` is in no other field, and its data is being (or was not yet)
    deleted; a store removes it from ``deleting`` only after its data is gone,
    so a crash between the two leaves a record for ``gc`` to finish.
    """

    seq: int = 0
    live: int | None = None
    history: list[int] = Field(default_factory=list)  # published, oldest first; last is live
    versions: dict[int, VersionInfo] = Field(default_factory=dict)
    runs: dict[str, int] = Field(default_factory=dict)
    ttl_seconds: int | None = None  # lifetime of each version's data after it is loaded
    deleting: dict[int, VersionInfo] = Field(default_factory=dict)

    def live_info(self) -> VersionInfo | None:
        return self.versions.get(self.live) if self.live is not None else None

    def begin(self, new: NewVersion) -> tuple[NamespaceState, VersionInfo]:
        """Allocate a version for a run, or return the run's existing one (a retry)."""
        existing = self.runs.get(new.run_id)
        if existing is not None and existing in self.versions:
            return self, self.versions[existing]
        state = self.model_copy(deep=True)
        state.seq += 1
        info = VersionInfo(version=state.seq, **new.model_dump())
        state.versions[info.version] = info
        state.runs[new.run_id] = info.version
        return state, info

    def complete(self, namespace: str, version: int, key_count: int) -> NamespaceState:
        state = self.model_copy(deep=True)
        info = state._require(namespace, version)
        info.state = "complete"
        info.key_count = key_count
        info.completed_at = utcnow()
        if state.ttl_seconds:
            info.expires_at = _later(info.completed_at, state.ttl_seconds)
        return state

    def set_ttl(self, ttl_seconds: int | None) -> NamespaceState:
        """Record the namespace's TTL; versions completed from now on expire after it."""
        state = self.model_copy(deep=True)
        state.ttl_seconds = ttl_seconds or None
        return state

    def publish(
        self, namespace: str, version: int, keep: int
    ) -> tuple[NamespaceState, list[VersionInfo]]:
        """Make ``version`` live; return the new state and the versions to delete.

        Publishing the live version again changes nothing. Versions that were
        published once and fell out of the last ``keep`` are dropped; versions
        never published (another run's export in flight) are left alone.
        """
        info = self._require(namespace, version)
        if info.state != "complete":
            raise VersionIncomplete(
                f"Version {version} of namespace '{namespace}' cannot be published",
                expected="a completely loaded version",
                found=f"state '{info.state}' with {info.key_count} keys",
                fix="Re-run the export step of that run, then publish",
            )
        if self.live == version:
            return self, []
        if info.published_at is not None:
            raise AlreadyPublished(
                f"Version {version} of namespace '{namespace}' was published before and is "
                f"no longer live (live is {self.live})",
                fix=f"To serve it again use: batchscore rollback {namespace} --to {version}",
            )
        state = self.model_copy(deep=True)
        state.versions[version].published_at = utcnow()
        state.history = [v for v in state.history if v != version] + [version]
        state.live = version
        return state._drop_beyond(keep)

    def rollback(self, namespace: str, to: int | None = None) -> NamespaceState:
        if self.live is None:
            raise VersionNotFound(
                f"Namespace '{namespace}' has no live version to roll back from",
                fix="Publish a version first",
            )
        state = self.model_copy(deep=True)
        if to is None:
            if len(state.history) < 2:
                raise VersionNotFound(
                    f"Namespace '{namespace}' keeps no version before the live one "
                    f"(version {self.live})",
                    expected="at least two kept versions",
                    found=f"kept versions {state.history}",
                    fix="Raise BATCHSCORE_KEEP_VERSIONS to keep more versions for rollback",
                )
            state.history.pop()
        else:
            target = state._require(namespace, to)
            if target.state != "complete":
                raise VersionIncomplete(
                    f"Version {to} of namespace '{namespace}' is still loading",
                    expected="a completely loaded version",
                )
            state.history = [v for v in state.history if v != to] + [to]
        state.live = state.history[-1]
        state.versions[state.live].published_at = utcnow()
        return state

    def drop(self, version: int) -> NamespaceState:
        """Forget a version for readers and move it to ``deleting`` until its data is gone."""
        state = self.model_copy(deep=True)
        info = state.versions.pop(version, None)
        if info is not None:
            state.deleting[version] = info
        state.history = [v for v in state.history if v != version]
        state.runs = {r: v for r, v in state.runs.items() if v != version}
        return state

    def forget(self, versions: Sequence[int]) -> NamespaceState:
        """The data of these versions is deleted: drop their ``deleting`` records."""
        state = self.model_copy(deep=True)
        for version in versions:
            state.deleting.pop(version, None)
        return state

    def gc(
        self, keep: int, now: datetime | None = None
    ) -> tuple[NamespaceState, list[VersionInfo]]:
        """Everything retention lets go: return the new state and the versions to delete.

        Goes: published versions beyond the last ``keep``; versions never
        published and numbered below the live one (a run that was superseded
        before it was published, or gave up mid-load); expired versions that
        are not live; and versions left in ``deleting`` by an interrupted
        delete. Stays: the live version, the last ``keep`` published, and any
        never-published version newer than the live one (an export in flight).
        """
        state, doomed = self._drop_beyond(keep)
        stale = [
            info
            for v, info in state.versions.items()
            if v != state.live
            and (
                (info.published_at is None and state.live is not None and v < state.live)
                or info.expired(now)
            )
        ]
        for info in stale:
            state = state.drop(info.version)
        leftovers = [info for v, info in self.deleting.items()]
        return state, doomed + stale + leftovers

    def _drop_beyond(self, keep: int) -> tuple[NamespaceState, list[VersionInfo]]:
        kept = set(self.history[-keep:])
        doomed = [
            info
            for v, info in self.versions.items()
            if v not in kept and v != self.live and info.published_at is not None
        ]
        state = self.model_copy(deep=True)
        for info in doomed:
            state = state.drop(info.version)
        state.history = [v for v in state.history if v in kept]
        return state, doomed

    def _require(self, namespace: str, version: int) -> VersionInfo:
        info = self.versions.get(version)
        if info is None:
            raise VersionNotFound(
                f"Namespace '{namespace}' has no version {version}",
                expected=f"one of {sorted(self.versions)}" if self.versions else None,
                found="no versions" if not self.versions else None,
            )
        return info


class PredictionStore(Protocol):
    """Versioned predictions per namespace; readers only ever see published versions."""

    url: str

    def begin_version(self, namespace: str, new: NewVersion) -> VersionInfo: ...

    def write(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None: ...

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        """Bulk load: ``keys`` as ``encoding.text_keys`` makes them, ``values`` (rows, outputs)."""
        ...

    def complete_version(self, namespace: str, version: int, key_count: int) -> VersionInfo: ...

    def publish(self, namespace: str, version: int, keep: int) -> VersionInfo: ...

    def rollback(self, namespace: str, to: int | None = None) -> VersionInfo: ...

    def state(self, namespace: str) -> NamespaceState: ...

    def namespaces(self) -> list[str]: ...

    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...

    def delete_version_data(self, namespace: str, info: VersionInfo) -> None: ...

    def gc(self, namespace: str, keep: int) -> list[VersionInfo]:
        """Delete what ``NamespaceState.gc`` lets go; return the versions deleted."""
        ...

    def set_ttl(self, namespace: str, ttl_seconds: int | None) -> NamespaceState: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class AsyncPredictionReader(Protocol):
    """The read-only, async side of a store, for the lookup API's hot path.

    Every method either answers or raises ``StoreUnavailable`` within the
    store's timeout; ``get_many`` is one round trip whatever the number of keys.
    """

    url: str

    async def state(self, namespace: str) -> NamespaceState: ...

    async def namespaces(self) -> list[str]: ...

    async def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(
    url: str, *, timeout_seconds: float = 5.0, password: str | None = None
) -> PredictionStore:
    """Open the store a URL names: ``lmdb://PATH`` (or a bare path) or ``redis[s]://``.

    ``password`` (``BATCHSCORE_STORE_PASSWORD``) is used for Redis when the URL
    carries none; a password in the URL wins.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from kv_export.redis_store import RedisStore

        return RedisStore(url, timeout_seconds=timeout_seconds, password=password)
    if scheme in ("lmdb", ""):
        from kv_export.lmdb_store import LmdbStore

        path = url[len("lmdb://") :] if scheme == "lmdb" else url
        if not path:
            raise BadStoreUrl(
                f"Store URL '{url}' names no folder", expected="lmdb:///path/to/store"
            )
        return LmdbStore(path)
    raise BadStoreUrl(
        f"Store URL '{redact_url(url)}' has an unknown scheme '{scheme}'",
        expected="lmdb:///path (embedded), redis://host:port/db or rediss://host:port/db",
    )


__all__ = [
    "AsyncPredictionReader",
    "NamespaceState",
    "NewVersion",
    "PartInfo",
    "PredictionStore",
    "StoreError",
    "VersionInfo",
    "open_store",
    "redact_url",
]
