"""Store URLs as the ground floor sees them: the secret split off, a label safe to show.

Settings move a URL's password into ``store_password`` (``split_password``); manifests and
logs name a store by ``public_url``. Both are pure string functions, so they live here,
below every layer that reads settings or writes a manifest.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_QUERY_KEYS = {"password", "ssl_password"}


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without the password in its user part, and that password (or None)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc)), parts.password


def public_url(url: str) -> str:
    """``url`` without its password (user kept) or secret query options; a bare LMDB path
    as ``lmdb://PATH``. Two URLs of one store give one label, whatever the password."""
    parts = urlsplit(url)
    if not parts.scheme:
        return f"lmdb://{url}"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k not in SECRET_QUERY_KEYS]
    if netloc == parts.netloc and len(kept) == len(pairs):
        return url  # nothing secret (urlunsplit would also drop lmdb:///'s empty host)
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(kept)))
