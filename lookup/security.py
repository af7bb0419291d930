"""API keys with per-key namespace scopes, and a per-key token-bucket rate limit.

Keys come from ``BATCHSCORE_API_KEYS`` (JSON ``{"key": ["ns", ...]}``) and/or the
file ``BATCHSCORE_API_KEYS_FILE``, one key a line::

    # comment
    s3cr3t-key-1: churn, fraud
    s3cr3t-key-2: *

Invariants: authentication is off only when no keys are configured at all (neither
setting set; ``create_app`` logs it); a setting that is set but holds no key refuses
to start. Keys are held only
as SHA-256 digests and every presented key is compared with every digest with
``hmac.compare_digest`` (no early exit), so the time taken does not depend on
which key, or how much of one, matched. Logs and metrics name a key by the first
8 hex digits of its digest, never by the key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchscore.core.errors import SettingsError
from batchscore.core.settings import ApiSettings
from lookup.errors import ApiError

ALL_NAMESPACES = "*"


@dataclass(frozen=True)
class Principal:
    key_id: str
    namespaces: frozenset[str]

    def may_read(self, namespace: str) -> bool:
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces


ANONYMOUS = Principal("anonymous", frozenset({ALL_NAMESPACES}))


def parse_keys_file(path: Path) -> dict[str, list[str]]:
    """``key: ns1,ns2`` lines; a bad line fails naming the file and line, never the key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(
            f"Cannot read the API keys file {path}",
            found=type(exc).__name__,
            fix="Check BATCHSCORE_API_KEYS_FILE",
        ) from None
    keys: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, scopes = line.rpartition(":")
        namespaces = [n.strip() for n in scopes.split(",") if n.strip()]
        if not sep or not key.strip() or not namespaces:
            raise SettingsError(
                f"Line {number} of the API keys file {path} is not 'key: ns1,ns2'",
                expected="'key: ns1,ns2' or 'key: *'",
                fix="Fix that line (blank lines and # comments are allowed)",
            )
        keys[key.strip()] = namespaces
    return keys


class ApiKeys:
    def __init__(self, keys: Mapping[str, Sequence[str]]) -> None:
        self._entries = [
            (
                hashlib.sha256(key.encode()).digest(),
                Principal(hashlib.sha256(key.encode()).hexdigest()[:8], frozenset(namespaces)),
            )
            for key, namespaces in keys.items()
        ]

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ApiKeys:
        """The configured keys. Authentication is off only when neither setting is set: a
        setting that is set but holds no key (an empty file, comments only, ``{}``) is a
        mistake that would otherwise open every namespace to everyone, so it is refused."""
        keys = dict(settings.api_keys or {})
        if settings.api_keys is not None and not settings.api_keys:
            raise SettingsError(
                "BATCHSCORE_API_KEYS is set but holds no key",
                expected='at least one key, as {"key": ["ns", ...]}',
                fix="Add a key, or unset BATCHSCORE_API_KEYS to run without authentication",
            )
        if settings.api_keys_file is not None:
            from_file = parse_keys_file(settings.api_keys_file)
            if not from_file:
                raise SettingsError(
                    f"The API keys file {settings.api_keys_file} "
                    "(BATCHSCORE_API_KEYS_FILE) holds no key",
                    expected="at least one 'key: ns1,ns2' line",
                    fix="Add a key, or unset BATCHSCORE_API_KEYS_FILE to run without "
                    "authentication",
                )
            keys.update(from_file)
        for number, namespaces in enumerate(keys.values(), start=1):
            if not [n for n in namespaces if n.strip()]:
                raise SettingsError(
                    f"API key number {number} of BATCHSCORE_API_KEYS has no namespace",
                    expected='a list of namespaces, or ["*"] for every one',
                    fix="Give the key its namespaces, or remove it",
                )
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, presented: str | None) -> Principal:
        """The key's principal; 401 for a missing or unknown key. Constant time in the key."""
        if not self._entries:
            return ANONYMOUS
        if not presented:
            raise ApiError(
                401,
                "unauthenticated",
                "An API key is required (Authorization: Bearer or X-API-Key)",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise ApiError(
                401, "invalid_api_key", "The API key is not valid", {"WWW-Authenticate": "Bearer"}
            )
        return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class RateLimiter:
    """A token bucket per caller: ``rate`` tokens a second, at most ``burst`` saved up.

    In-process (per uvicorn worker): with N workers a caller gets up to N times
    the rate. Buckets of idle callers are forgotten beyond ``max_callers``; a
    forgotten bucket comes back full, which is what it would have refilled to.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        max_callers: int = 100_000,
        refusal: str = "Too many requests for this API key",
    ) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, round(rate)))
        self.max_callers = max_callers
        self.refusal = refusal
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, caller: str) -> None:
        """Take one token or raise 429 with ``Retry-After`` (whole seconds, at least 1)."""
        now = time.monotonic()
        tokens = self._tokens(self._buckets.pop(caller, None), now)
        if len(self._buckets) >= self.max_callers:
            self._buckets.pop(next(iter(self._buckets)))
        if tokens < 1:
            self._buckets[caller] = (tokens, now)
            raise self._refused(tokens)
        self._buckets[caller] = (tokens - 1, now)

    def refuse_if_empty(self, caller: str) -> None:
        """Raise ``check``'s 429 if the caller has no token left, without taking one."""
        tokens = self._tokens(self._buckets.get(caller), time.monotonic())
        if tokens < 1:
            raise self._refused(tokens)

    def _tokens(self, bucket: tuple[float, float] | None, now: float) -> float:
        tokens, then = bucket or (self.burst, now)
        return min(self.burst, tokens + (now - then) * self.rate)

    def _refused(self, tokens: float) -> ApiError:
        wait = max(1, int(-(-(1 - tokens) // self.rate)))
        return ApiError(429, "rate_limited", self.refusal, {"Retry-After": str(wait)})
