"""Browser sessions on top of the HTTP API keys: the run console's login.

Pure: no clock (``now`` is passed), no I/O; the one-time use of a login
token is enforced by the caller. Tokens are stateless and signed,
``<kind>.<key id>.<scope>.<nonce>.<expires>.<signature>`` (``kind``: ``login``
or ``session``), under a secret derived from the key itself, so any replica
with the same keys accepts them and removing a key ends its sessions; the
CSRF token is an HMAC of the nonce. Why and how: docs/console.md, "Sessions,
several replicas, removed keys" and "CSRF and other sites"."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

COOKIE: Final = "baton_session"
CSRF_HEADER: Final = "X-Baton-CSRF"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

Kind = Literal["login", "session"]


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified token: whose key opened it, for which scope, until when."""

    kind: Kind
    key_id: str
    scope: str  # a tenant, or "*" (an operator)
    nonce: str
    expires: float


def key_id(key: str) -> str:
    """The public id of an API key (a hash prefix: it does not reveal the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class SessionKeys:
    """Issues and verifies login and session tokens for a set of API keys
    (key -> tenant or ``*``)."""

    def __init__(self, api_keys: Mapping[str, str]) -> None:
        """``api_keys``: the live mapping (the orchestrator withdraws a key
        from it when the registry rotates or deletes its tenant: that key's
        sessions end with it). Digests (``sha256:``) open no session: the
        key itself, which signs them, is not known."""
        self._keys = api_keys
        self._ids: dict[str, str] = {}  # key id -> key, for every key seen

    def _found(self, kid: str) -> tuple[str, str] | None:
        """The key of that id and its scope, while it is configured."""
        if kid not in self._ids:  # index the keys not indexed yet
            for k in self._keys:
                if not k.startswith("sha256:"):
                    self._ids.setdefault(key_id(k), k)
        key = self._ids.get(kid)
        scope = self._keys.get(key) if key is not None else None
        return (key, scope) if key is not None and scope is not None else None

    def scope_of(self, key: str) -> str | None:
        """The scope of an API key (None: not a configured key)."""
        found = self._found(key_id(key))
        return found[1] if found is not None and hmac.compare_digest(found[0], key) else None

    @staticmethod
    def _secret(key: str) -> bytes:
        return hmac.new(key.encode(), b"baton-console-session", hashlib.sha256).digest()

    def issue(self, key: str, kind: Kind, *, nonce: str, expires: float) -> str:
        """A token of ``kind`` for a configured ``key``.

        Raises:
            KeyError: ``key`` is not a configured API key.
        """
        scope = self.scope_of(key)
        if scope is None:
            raise KeyError("not a configured API key")
        body = f"{kind}.{key_id(key)}.{scope}.{nonce}.{int(expires)}"
        sig = hmac.new(self._secret(key), body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(sig)}"

    def verify(self, token: str, kind: Kind, now: float) -> Grant | None:
        """The token's grant, or None: malformed, another kind, expired,
        forged, or its key removed or mapped to another scope since."""
        parts = token.split(".")
        if len(parts) != 6 or parts[0] != kind:
            return None
        _, kid, scope, nonce, expires, sig = parts
        found = self._found(kid)
        if found is None or found[1] != scope or not expires.isdigit():
            return None
        body = ".".join(parts[:5]).encode()
        want = _b64(hmac.new(self._secret(found[0]), body, hashlib.sha256).digest())
        if not hmac.compare_digest(want, sig) or int(expires) <= now:
            return None
        return Grant(kind, kid, scope, nonce, float(expires))

    def key_of(self, grant: Grant) -> str:
        """The API key a verified grant stands for."""
        found = self._found(grant.key_id)
        if found is None:
            raise KeyError("the key was withdrawn")
        return found[0]

    def csrf(self, grant: Grant) -> str:
        """The CSRF token of a session."""
        key = self.key_of(grant)
        return _b64(hmac.new(self._secret(key), f"csrf.{grant.nonce}".encode(),
                             hashlib.sha256).digest())  # fmt: skip

    def csrf_ok(self, grant: Grant, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(self.csrf(grant), value)


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` header (absent: not a cross-site browser
    request) names the host it was sent to."""
    if origin is None:
        return True
    if host is None:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host
