"""The root of every batchscore exception, and the map of all of them.

Each package draws its own part of the tree in its ``errors`` module; this is the whole
tree in one place (``tests/unit/test_error_tree.py`` fails when a class is missing here or
drawn under the wrong parent)::

    BatchscoreError                         a failure a user can act on
    ├── SettingsError                       (batchscore.core.errors) a setting batchscore cannot use
    ├── InvalidName                         (batchscore.core.errors) a namespace breaks the rule
    ├── DemoFailed                          (batchscore.core.errors) a check of `batchscore demo`
    ├── JobConfigError                      (batchscore_dags.errors) a job YAML that cannot be a DAG
    ├── RegistryError                       (registry.errors)
    │   └── ModelNotFound                   no such model, version or alias
    ├── ScoringError                        (scoring.errors)
    │   ├── InputError                      bad input, found before anything is scored
    │   │   ├── InputNotFound               (retried by the DAG: the input may land late)
    │   │   ├── CorruptInput
    │   │   ├── MissingColumn
    │   │   ├── BadColumnType
    │   │   ├── BadKeyColumn
    │   │   ├── TooManyNulls                a feature's null rate is above the bound
    │   │   └── InputAccessDenied           an object store refused the credentials
    │   ├── UnsupportedModel                a flavor or format batchscore cannot load
    │   ├── ShardFailed                     a shard could not be scored
    │   ├── ValidationFailed                the output broke an expectation
    │   ├── DriftDetected                   the output moved too far from the live version
    │   └── QualityConfigError              the quality config file is unusable
    ├── StoreError                          (kv_export.errors)
    │   ├── StoreUnavailable                the store cannot be reached or timed out
    │   │   ├── StoreAuthFailed             the store refused the credentials
    │   │   └── CircuitOpen                 (lookup.errors) the API's breaker is open
    │   ├── NamespaceNotFound               the store holds nothing of the namespace
    │   ├── BadStoreUrl                     a store URL batchscore cannot open
    │   ├── VersionNotFound                 no such version in the namespace
    │   ├── VersionIncomplete               still loading, or never finished
    │   ├── VersionOutOfOrder               older data than the newest published
    │   ├── VersionExpired                  its TTL has passed
    │   ├── AlreadyPublished                published once, no longer live
    │   ├── CanaryRefused                   a canary change the namespace state refuses
    │   └── BadCanaryPercent                a canary share outside (0, 100)
    └── RunError                            (jobs.errors) a run that cannot go on as asked

The lookup API's answers to a client are a tree of their own, outside this one: they
carry an HTTP status and a message safe to show, never internals::

    ApiError                                (lookup.errors) status, code, message
    └── NamespaceStateInvalid               the store's state of a namespace is unreadable

Every ``BatchscoreError`` builds its message from structured fields: what failed, what
was expected, what was found, and how to fix it, so that a CLI user, an Airflow task log
and an API client all read the same sentence.
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
