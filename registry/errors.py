"""Registry errors: ``RegistryError`` └── ``ModelNotFound``.

A model the registry has but batchscore cannot score is ``scoring.errors.UnsupportedModel``:
the scoring side reads the model and decides.
"""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class RegistryError(BatchscoreError):
    """The model registry could not give what the run needs."""


class ModelNotFound(RegistryError):
    """A model name, version or alias that the registry does not have."""
