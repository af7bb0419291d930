"""What every route checks before it looks anything up: who calls (API key, failed
authentications per address), at what rate, for which namespace, and with what key."""

from __future__ import annotations

import logging
import re

from fastapi import Request

from batchscore.core.names import NAMESPACE_RE
from batchscore.core.settings import ApiSettings
from lookup.errors import ApiError
from lookup.security import ANONYMOUS, ApiKeys, Principal, RateLimiter, presented_key

log = logging.getLogger("batchscore.lookup")

KEY_CHARACTERS = "A-Za-z0-9._:@+=~-"
KEY_RE = re.compile(f"[{KEY_CHARACTERS}]+")
VALID_NAMESPACES_KEPT = 10_000  # then forgotten all at once (probing cannot grow it)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Guard:
    """Authentication, per-key namespace scope, rate limit and input checks."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.max_key_length = settings.max_key_length  # read on every lookup
        # Names that passed NAMESPACE_RE: the check is the same every time for a name.
        self._valid_namespaces: set[str] = set()
        self.keys = ApiKeys.from_settings(settings)
        self.authenticating = self.keys.enabled  # the keys never change once read
        if not self.authenticating:
            log.warning(
                "authentication is off: neither BATCHSCORE_API_KEYS nor "
                "BATCHSCORE_API_KEYS_FILE is set, so every client may read every namespace"
            )
        rate = settings.rate_limit_per_second
        self.limiter = RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None
        failures = settings.auth_failures_per_minute
        self.failures = (
            RateLimiter(
                failures / 60,
                failures,
                refusal="Too many failed authentications from this address",
            )
            if failures > 0 and self.keys.enabled
            else None
        )

    def caller(self, request: Request) -> Principal:
        """The request's principal (auth and rate limit). A plain call, not a FastAPI
        dependency: resolving dependencies would cost more than the rest of a lookup.

        Failed authentications are limited per client address before any key is checked:
        an address that used up its failures gets 429 whatever key it presents, so that
        guessing cannot go on at the speed of the server."""
        principal = ANONYMOUS
        if self.authenticating:  # with authentication off there is no header worth parsing
            principal = self._authenticate(request)
        request.scope.setdefault("state", {})["key_id"] = principal.key_id  # request.state's dict
        if self.limiter is not None:
            self.limiter.check(principal.key_id if self.authenticating else client_address(request))
        return principal

    def _authenticate(self, request: Request) -> Principal:
        headers = request.headers
        presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        if self.failures is None:
            return self.keys.authenticate(presented)
        address = client_address(request)
        self.failures.refuse_if_empty(address)
        try:
            return self.keys.authenticate(presented)
        except ApiError:
            self.failures.check(address)  # one failure counted (a token is left: just checked)
            raise

    def namespace(self, principal: Principal, namespace: str) -> None:
        if namespace not in self._valid_namespaces:
            if not NAMESPACE_RE.fullmatch(namespace):
                raise ApiError(
                    422, "invalid_namespace", "A namespace is 1-128 characters of A-Z a-z 0-9 . _ -"
                )
            if len(self._valid_namespaces) >= VALID_NAMESPACES_KEPT:
                self._valid_namespaces.clear()
            self._valid_namespaces.add(namespace)
        if not principal.may_read(namespace):
            raise ApiError(403, "forbidden", f"This API key may not read namespace '{namespace}'")

    def key(self, key: str) -> None:
        """``KEY_RE``, with keys of ASCII letters and digits alone (the usual: ids) passed
        without running the regex."""
        if len(key) > self.max_key_length or not (
            (key.isascii() and key.isalnum()) or KEY_RE.fullmatch(key)
        ):
            raise ApiError(
                422,
                "invalid_key",
                f"A key is 1-{self.max_key_length} characters of {KEY_CHARACTERS}",
            )
