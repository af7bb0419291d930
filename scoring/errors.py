"""Scoring errors.

::

    ScoringError
    ├── InputError            bad input, found before anything is scored
    │   ├── InputNotFound
    │   ├── CorruptInput
    │   ├── MissingColumn
    │   ├── BadColumnType
    │   ├── BadKeyColumn
    │   ├── TooManyNulls      a feature's null rate is above the bound
    │   └── InputAccessDenied the object store refused the credentials (or found none)
    ├── UnsupportedModel      a registered model batchscore cannot load or score
    ├── ShardFailed           a shard could not be scored
    ├── ValidationFailed      the output broke an expectation
    ├── DriftDetected         the output moved too far from the live version
    └── QualityConfigError    the quality config file is unusable
"""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class ScoringError(BatchscoreError):
    """Scoring could not produce a complete, valid output."""


class InputError(ScoringError):
    """The input does not match what the model and the run need."""


class InputNotFound(InputError):
    pass


class CorruptInput(InputError):
    pass


class MissingColumn(InputError):
    pass


class BadColumnType(InputError):
    pass


class BadKeyColumn(InputError):
    pass


class UnsupportedModel(ScoringError):
    """A registered model that batchscore cannot score (flavor, signature, format), or a
    pickled one where pickles are not allowed: found reading its MLmodel, before any
    worker loads it."""


class ShardFailed(ScoringError):
    pass


class ValidationFailed(ScoringError):
    """At least one expectation failed; ``failures`` lists them."""

    def __init__(self, what: str, *, failures: list[dict[str, object]], **kw: str) -> None:
        self.failures = failures
        super().__init__(what, **kw)


class TooManyNulls(InputError):
    pass


class InputAccessDenied(InputError):
    """An object store refused to list or read the input: no credentials, wrong ones, or
    a policy that denies the object. Not retried: waiting does not change credentials."""


class DriftDetected(ScoringError):
    """At least one output drifted past its thresholds; ``drift`` lists every output."""

    def __init__(self, what: str, *, drift: list[dict[str, object]], **kw: str) -> None:
        self.drift = drift
        super().__init__(what, **kw)


class QualityConfigError(ScoringError):
    pass
