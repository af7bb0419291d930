"""KV store errors.

::

    StoreError
    ├── StoreUnavailable     the store cannot be reached or timed out
    │   └── StoreAuthFailed  the store refused the credentials (password, ACL user)
    ├── NamespaceNotFound    the store holds nothing of the namespace
    ├── BadStoreUrl          a store URL batchscore cannot open
    ├── VersionNotFound      no such version in the namespace
    ├── VersionIncomplete    the version is still loading (or was never finished)
    ├── VersionOutOfOrder    its data is older than the newest published (--force overrides)
    ├── VersionExpired       its TTL has passed
    ├── AlreadyPublished     published once and no longer live: back only by rollback
    ├── CanaryRefused        the namespace's state does not allow that canary change
    └── BadCanaryPercent     a canary share outside (0, 100)
"""

from __future__ import annotations

from batchscore.core.errors import BatchscoreError


class StoreError(BatchscoreError):
    pass


class StoreUnavailable(StoreError):
    pass


class StoreAuthFailed(StoreUnavailable):
    """Redis answered, but refused the password or ACL user it was given (or none)."""


class NamespaceNotFound(StoreError):
    """The store holds no version and no record of the namespace."""


class BadStoreUrl(StoreError):
    pass


class VersionNotFound(StoreError):
    pass


class VersionIncomplete(StoreError):
    pass


class AlreadyPublished(StoreError):
    """The version was published once and is no longer live: republish only by rollback."""


class VersionOutOfOrder(StoreError):
    """The version's data is older than what the namespace has served: versions go live
    in order (DESIGN invariant 9) unless an operator forces it."""


class VersionExpired(StoreError):
    """The version's TTL has passed: its data is gone (Redis) or answers nothing (LMDB)."""


class CanaryRefused(StoreError):
    """A canary change the namespace's state does not allow (no live version to canary
    against, no canary to promote or abort, a second canary while one runs, a publish or
    rollback while one runs); the state is left as it was."""


class BadCanaryPercent(StoreError):
    """A canary's share of keys outside (0, 100), or finer than the 0.01 % slots."""
