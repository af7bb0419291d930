"""What every real store shares: the namespace state changes, expressed once.

A store implements ``_update`` (atomic read-modify-write of one namespace's
state), ``_read`` and the data operations; this base turns the pure
``NamespaceState`` transitions into store operations.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from kv_export.store import NamespaceState, NewVersion, VersionInfo

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

    def state(self, namespace: str) -> NamespaceState:
        return self._read(namespace)

    def begin_version(self, namespace: str, new: NewVersion) -> VersionInfo:
        return self._update(namespace, lambda s: s.begin(new))

    def complete_version(self, namespace: str, version: int, key_count: int) -> VersionInfo:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo]:
            new = s.complete(namespace, version, key_count)
            return new, new.versions[version]

        return self._update(namespace, change)

    def publish(self, namespace: str, version: int, keep: int) -> VersionInfo:
        def change(s: NamespaceState) -> tuple[NamespaceState, tuple[VersionInfo, list]]:
            new, doomed = s.publish(namespace, version, keep)
            return new, (new.versions[version], doomed)

        info, doomed = self._update(namespace, change)
        # The flip is done; old data is deleted after it, invisible to readers.
        for old in doomed:
            self.delete_version_data(namespace, old)
        return info

    def rollback(self, namespace: str, to: int | None = None) -> VersionInfo:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo]:
            new = s.rollback(namespace, to)
            live = new.live_info()
            assert live is not None
            return new, live

        return self._update(namespace, change)

    def drop_version(self, namespace: str, version: int) -> None:
        def change(s: NamespaceState) -> tuple[NamespaceState, VersionInfo | None]:
            return s.drop(version), s.versions.get(version)

        info = self._update(namespace, change)
        if info is not None:
            self.delete_version_data(namespace, info)

    @abstractmethod
    def get_many(
        self, namespace: str, info: VersionInfo, keys: Sequence[bytes]
    ) -> list[bytes | None]: ...
