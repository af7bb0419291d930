"""What every real store shares: the namespace state changes, expressed once.

A store implements ``_update`` (atomic read-modify-write of one namespace's
state), ``_read`` and the data operations; this base turns the pure
``NamespaceState`` transitions into store operations.

Deleting old versions: the state change comes first (the version leaves
``versions`` for ``deleting``, so no reader can reach it), then its data is
deleted in batches, then the ``deleting`` record is forgotten. A crash in
between leaves the record, and the next ``gc`` (or publish) finishes the job.
Deletion runs synchronously in the caller (the publish step or ``batchscore
gc``), after the flip; on Redis it is UNLINK, whose memory is freed in Redis's
background thread, so Redis itself is never blocked by it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import pyarrow as pa

from batchscore.core.names import check_namespace
from kv_export.state import NamespaceState, NewVersion, VersionInfo

T = TypeVar("T")
log = logging.getLogger(__name__)


class StateBackedStore(ABC):
    url: str

    @abstractmethod
    def _update(
        self, namespace: str, change: Callable[[NamespaceState], tuple[NamespaceState, T]]
    ) -> T: ...

    @abstractmethod
    def _read(self, namespace: str) -> NamespaceState: ...

    @abstractmethod
    def delete_version_data(self, namespace: str, info: VersionInfo) -> None: ...

    @abstractmethod
    def write(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None: ...

    def state(self, namespace: str) -> NamespaceState:
        return self._read(namespace)

    def begin_version(self, namespace: str, new: NewVersion) -> VersionInfo:
        check_namespace(namespace)  # a namespace enters the store here: no key before it
        return self._update(namespace, lambda s: s.begin(new))

    def write_columns(
        self, namespace: str, info: VersionInfo, keys: pa.BinaryArray, values: np.ndarray
    ) -> None:
        from kv_export.encoding import pack_values

        self.write(namespace, info, keys.to_pylist(), pack_values(values))

    def complete_version(self, namespace: str, version: int, key_count: int) -> VersionInfo:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo]:
            new = s.complete(namespace, version, key_count)
            return new, new.versions[version]

        info = self._update(namespace, change)
        if info.expires_at is not None:
            self.expire_version_data(namespace, info)
        return info

    def expire_version_data(self, namespace: str, info: VersionInfo) -> None:  # noqa: B027
        """Let the store itself drop the data at ``info.expires_at`` where it can.

        Readers treat an expired version as empty in every store; stores without
        native expiry (LMDB) keep the bytes until ``gc`` deletes the version.
        """

    def set_ttl(self, namespace: str, ttl_seconds: int | None) -> NamespaceState:
        check_namespace(namespace)
        return self._update(namespace, lambda s: (new := s.set_ttl(ttl_seconds), new))

    def gc(
        self,
        namespace: str,
        keep: int,
        *,
        loading_grace_seconds: int | None = None,
        spare_run: str | None = None,
        budget_seconds: float | None = None,
    ) -> list[VersionInfo]:
        doomed = self._update(
            namespace,
            lambda s: s.gc(keep, loading_grace_seconds=loading_grace_seconds, spare_run=spare_run),
        )
        return self._delete(namespace, doomed, budget_seconds)

    def _delete(
        self, namespace: str, doomed: Sequence[VersionInfo], budget_seconds: float | None = None
    ) -> list[VersionInfo]:
        """Delete the versions' data, then forget their records; past the budget (checked
        between versions) the rest stays in ``deleting`` for the next collection."""
        if not doomed:
            return []
        deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
        deleted: list[VersionInfo] = []
        for old in doomed:
            if deadline is not None and deleted and time.monotonic() >= deadline:
                log.info("collection budget spent; %d versions left", len(doomed) - len(deleted))
                break
            self.delete_version_data(namespace, old)
            deleted.append(old)
        gone = [old.version for old in deleted]
        self._update(namespace, lambda s: (s.forget(gone), None))
        return deleted

    def publish(
        self, namespace: str, version: int, keep: int, *, force: bool = False
    ) -> VersionInfo:
        check_namespace(namespace)

        def change(s: NamespaceState) -> tuple[NamespaceState, tuple[VersionInfo, list]]:
            new, doomed = s.publish(namespace, version, keep, force=force)
            return new, (new.versions[version], doomed)

        info, doomed = self._update(namespace, change)
        # The flip is done; old data is deleted after it, invisible to readers.
        self._delete(namespace, doomed)
        return info

    def rollback(self, namespace: str, to: int | None = None) -> VersionInfo:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo]:
            new = s.rollback(namespace, to)
            live = new.live_info()
            assert live is not None
            return new, live

        return self._update(namespace, change)

    def start_canary(
        self, namespace: str, version: int, percent: float, *, force: bool = False
    ) -> NamespaceState:
        """Serve ``version`` to ``percent`` % of the keys beside the live version: one
        atomic change of the namespace state (``NamespaceState.start_canary``)."""
        check_namespace(namespace)
        return self._update(
            namespace,
            lambda s: (new := s.start_canary(namespace, version, percent, force=force), new),
        )

    def set_canary_percent(self, namespace: str, percent: float) -> NamespaceState:
        check_namespace(namespace)
        return self._update(
            namespace, lambda s: (new := s.set_canary_percent(namespace, percent), new)
        )

    def promote_canary(self, namespace: str, keep: int) -> VersionInfo:
        """Make the canary live in one atomic change; old versions are deleted after it,
        as after a publish."""
        check_namespace(namespace)

        def change(s: NamespaceState) -> tuple[NamespaceState, tuple[VersionInfo, list]]:
            new, doomed = s.promote(namespace, keep)
            live = new.live_info()
            assert live is not None
            return new, (live, doomed)

        info, doomed = self._update(namespace, change)
        self._delete(namespace, doomed)
        return info

    def abort_canary(self, namespace: str) -> NamespaceState:
        check_namespace(namespace)
        return self._update(namespace, lambda s: (new := s.abort(namespace), new))

    def drop_version(self, namespace: str, version: int) -> None:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo | None]:
            return s.drop(version), s.versions.get(version)

        info = self._update(namespace, change)
        if info is not None:
            self._delete(namespace, [info])

    @abstractmethod
    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...
