"""The one way a step, a command or the API opens a store: from the settings.

Every place that touches a store (each step of a run, the drift gate, shadow runs,
``status``, ``versions``, ``rollback``, ``gc``, the DAG's tasks, the Dask workers that
export, the lookup API) builds a ``StoreTarget`` with ``store_target(settings, url)``
and opens it, so a password given as ``BATCHSCORE_STORE_PASSWORD`` (or any later store
setting) reaches all of them or none. ``kv_export.store.open_store`` is the low-level
opener behind it; nothing else calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from batchscore.core.urls import public_url

if TYPE_CHECKING:  # the store's modules import numpy and Arrow; manifests need only labels
    from kv_export.interface import PredictionStore

RUN_TIMEOUT_SECONDS = 5.0  # a pipeline's store calls: bulk writes need more than a lookup


class StoreSettings(Protocol):
    """What a settings class offers to open a store (``batchscore.core.settings`` has it)."""

    @property
    def resolved_store_url(self) -> str: ...

    @property
    def store_password(self) -> str | None: ...


@dataclass(frozen=True)
class StoreTarget:
    """A store as the settings name it: URL, password (never shown), timeout."""

    url: str
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = RUN_TIMEOUT_SECONDS

    @property
    def label(self) -> str:
        """The store's URL without any secret: what manifests, summaries and logs show."""
        return public_url(self.url)

    def __reduce__(self) -> tuple[object, tuple[str, float]]:
        """Sent to a Dask worker (or pickled anywhere) without the password: the worker
        takes it from its own ``BATCHSCORE_STORE_PASSWORD``. A secret never travels in
        task arguments, where the scheduler keeps and may log them."""
        return (_target_on_worker, (self.url, self.timeout_seconds))

    def open(self) -> PredictionStore:
        from kv_export.store import open_store

        return open_store(self.url, timeout_seconds=self.timeout_seconds, password=self.password)


def store_target(
    settings: StoreSettings, url: str | None = None, *, timeout_seconds: float | None = None
) -> StoreTarget:
    """The store ``url`` names (default: the settings' store), with the settings' password."""
    return StoreTarget(
        url=url or settings.resolved_store_url,
        password=settings.store_password,
        timeout_seconds=timeout_seconds or RUN_TIMEOUT_SECONDS,
    )


def _target_on_worker(url: str, timeout_seconds: float) -> StoreTarget:
    from batchscore.core.settings import RunSettings, load_settings

    return store_target(load_settings(RunSettings), url, timeout_seconds=timeout_seconds)


def open_from_settings(settings: StoreSettings, url: str | None = None) -> PredictionStore:
    return store_target(settings, url).open()


__all__ = [
    "StoreSettings",
    "StoreTarget",
    "open_from_settings",
    "store_target",
]
