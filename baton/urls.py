"""URLs fit for messages: credentials travel inside NATS URLs
(``nats://<user>:<password>@host:port``), and no message may show them."""

from __future__ import annotations


def redact(url: str) -> str:
    """``url`` with its password (if any) masked."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
