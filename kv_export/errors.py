"""KV store errors.

::

    StoreError
    ├── StoreUnavailable     the store cannot be reached or timed out
    │   └── StoreAuthFailed  the store refused the credentials (password, ACL user)
    ├── NamespaceNotFound    the store holds nothing of the namespace
    ├── BadStoreUrl          a store URL batchscore cannot open
    ├── VersionNotFound      no such version in the namespace
    └── VersionIncomplete    the version is still loading (or was never finished)
"""

from __future__ import annotations

from batchscore.errors import BatchscoreError


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
