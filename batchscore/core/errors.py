"""The root of every batchscore exception.

::

    BatchscoreError
    ├── SettingsError                      (batchscore.core.settings)
    ├── registry.errors.RegistryError
    │   ├── ModelNotFound
    │   └── UnsupportedModel
    ├── scoring.errors.ScoringError
    │   ├── InputError
    │   │   ├── InputNotFound
    │   │   ├── CorruptInput
    │   │   ├── MissingColumn
    │   │   ├── BadColumnType
    │   │   └── BadKeyColumn
    │   ├── ShardFailed
    │   └── ValidationFailed
    ├── kv_export.errors.StoreError
    │   ├── StoreUnavailable
    │   ├── BadStoreUrl
    │   ├── VersionNotFound
    │   └── VersionIncomplete
    └── jobs.errors.RunError

Every error builds its message from structured fields: what failed, what was
expected, what was found, and how to fix it, so that a CLI user, an Airflow
task log and an API client all read the same sentence.
"""

from __future__ import annotations


class BatchscoreError(Exception):
    """A failure a user can act on; the message says what, expected, found, fix."""

    def __init__(
        self,
        what: str,
        *,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.what = what
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.expected:
            parts.append(f"Expected {self.expected}.")
        if self.found:
            parts.append(f"Found {self.found}.")
        if self.fix:
            parts.append(self.fix.rstrip(".") + ".")
        return " ".join(parts)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields do not survive Exception's default pickling; Dask
        # pickles errors raised on workers back to the client.
        return (_rebuild, (type(self), self.__dict__.copy()))

    def to_dict(self) -> dict[str, str | None]:
        return {
            "type": type(self).__name__,
            "message": str(self),
            "what": self.what,
            "expected": self.expected,
            "found": self.found,
            "fix": self.fix,
        }


class SettingsError(BatchscoreError):
    """A setting has a value batchscore cannot use."""


class InvalidName(BatchscoreError):
    """A user-given name (a namespace) breaks the rule of its kind."""


class DemoFailed(BatchscoreError):
    """``batchscore demo`` ran but one of its checks did not hold."""


def _rebuild(cls: type[BatchscoreError], state: dict[str, object]) -> BatchscoreError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._message())
    return error
