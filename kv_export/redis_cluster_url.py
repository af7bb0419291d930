"""``redis+cluster://`` store URLs: a Redis Cluster named by its seed nodes.

Form: ``redis+cluster://[user][:password]@host:port[,host:port...][/][?options]``, or
``rediss+cluster://...`` for TLS. Any seed that answers is enough: the client asks it for
the cluster's slot map (``CLUSTER SLOTS``) and finds every other node from there, so list
a few nodes in case one is down. The user, password and query options (TLS options such
as ``ssl_ca_certs``, ``client_name``) are redis-py's, as in ``redis://`` URLs, and apply to
every node; a password in the URL wins over ``BATCHSCORE_STORE_PASSWORD``. A cluster has
only database 0, so the path is empty, ``/`` or ``/0``.

Pure string functions: the exporter (``kv_export.redis_cluster``) and the lookup API's
reader (``kv_export.redis_cluster_reader``) both read a URL through ``cluster_address``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from kv_export.errors import BadStoreUrl
from kv_export.interface import redact_url

SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
EXAMPLE = "redis+cluster://host:port,host:port/ (rediss+cluster:// for TLS)"


@dataclass(frozen=True)
class ClusterAddress:
    """A cluster URL taken apart: its seed nodes and the ``redis[s]://`` URL of a node."""

    url: str
    seeds: tuple[tuple[str, int], ...]
    scheme: str  # redis or rediss
    userinfo: str  # "user:password" as written, or ""
    query: str

    def node_url(self, host: str, port: int) -> str:
        """The plain ``redis[s]://`` URL of one node, with the cluster URL's credentials
        and options: what redis-py (and the reader's connection settings) understand."""
        user = f"{self.userinfo}@" if self.userinfo else ""
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{user}{shown}:{port}/0{query}"


def cluster_address(url: str) -> ClusterAddress:
    """``url`` taken apart; ``BadStoreUrl`` (password redacted) naming what is wrong."""
    parts = urlsplit(url)
    scheme = SCHEMES.get(parts.scheme)
    if scheme is None:
        raise BadStoreUrl(f"Store URL '{redact_url(url)}' is not a cluster URL", expected=EXAMPLE)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    seeds = tuple(_seed(url, item) for item in hosts.split(","))
    if parts.path not in ("", "/", "/0"):
        raise BadStoreUrl(
            f"Store URL '{redact_url(url)}' names database '{parts.path.lstrip('/')}'",
            expected="no database, or 0: a Redis Cluster has only database 0",
        )
    return ClusterAddress(url, seeds, scheme, userinfo, parts.query)


def _seed(url: str, item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadStoreUrl(
            f"Store URL '{redact_url(url)}' has a seed node '{item}' that is not host:port",
            expected=EXAMPLE,
        )
    return host, int(port)


__all__ = ["EXAMPLE", "SCHEMES", "ClusterAddress", "cluster_address"]
