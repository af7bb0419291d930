"""Registry errors: ``RegistryError`` ├── ``ModelNotFound`` └── ``UnsupportedModel``."""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class RegistryError(BatchscoreError):
    """The model registry could not give what the run needs."""


class ModelNotFound(RegistryError):
    """A model name, version or alias that the registry does not have."""


class UnsupportedModel(RegistryError):
    """A registered model that batchscore cannot score (flavor, signature, format)."""
