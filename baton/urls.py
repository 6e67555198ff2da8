"""URLs fit for messages: credentials travel inside NATS URLs
(``nats://<user>:<password>@host:port``), and no message may show them."""

from __future__ import annotations


def redact(url: str) -> str:
    """``url`` with its password (if any) masked; a comma-separated server
    list has each of its URLs masked."""
    if "," in url:
        return ",".join(redact(u) for u in url.split(","))
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
