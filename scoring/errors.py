"""Scoring errors.

::

    ScoringError
    ├── InputError            bad input, found before anything is scored
    │   ├── InputNotFound
    │   ├── CorruptInput
    │   ├── MissingColumn
    │   ├── BadColumnType
    │   └── BadKeyColumn
    ├── ShardFailed           a shard could not be scored
    └── ValidationFailed      the output broke an expectation
"""

from __future__ import annotations

from batchscore.errors import BatchscoreError


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


class ShardFailed(ScoringError):
    pass


class ValidationFailed(ScoringError):
    """At least one expectation failed; ``failures`` lists them."""

    def __init__(self, what: str, *, failures: list[dict[str, object]], **kw: str) -> None:
        self.failures = failures
        super().__init__(what, **kw)
