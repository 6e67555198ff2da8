"""URLs fit for messages: credentials travel inside NATS URLs
(``nats://<user>:<password>@host:port``), and no message may show them.

Against a server in operator mode a client presents a ``.creds`` file;
Baton's own tools (services, CLI, tests) then take one string,
``nats://host:port?creds=/path/to/x.creds``, which ``split_creds`` parts into
the servers and the file (nats-py: ``user_credentials=``). It names a file, no
secret.
"""

from __future__ import annotations

from pathlib import Path

CREDS_PARAM = "?creds="


def with_creds(url: str, creds: str | Path) -> str:
    """``url`` (one server or a comma-separated list) with a ``.creds`` file."""
    return f"{url}{CREDS_PARAM}{creds}"


def split_creds(url: str) -> tuple[str, str | None]:
    """``(servers, creds file or None)`` of a URL that may carry ``?creds=``."""
    servers, sep, creds = url.partition(CREDS_PARAM)
    return servers, (creds or None) if sep else None


def redact(url: str) -> str:
    """``url`` with its password (if any) masked; a comma-separated server
    list has each of its URLs masked."""
    url = split_creds(url)[0]
    if "," in url:
        return ",".join(redact(u) for u in url.split(","))
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
