"""Browser sessions on top of the HTTP API keys: the run console's login.

Pure: no clock (``now`` is passed), no I/O; the one-time use of a login
token is enforced by the caller. Tokens are stateless and signed,
``<kind>.<key id>.<scope>.<nonce>.<expires>.<signature>`` (``kind``: ``login``
or ``session``), under a secret derived from the key's SHA-256, so any replica
holding the key or only its digest (``sha256:<hex>``, a tenant created at
run time) accepts them and removing a key ends its sessions; the CSRF token
is an HMAC of the nonce. Why and how: docs/console.md, "Sessions,
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


_DIGEST: Final = "sha256:"


def _digest(entry: str) -> bytes | None:
    """The SHA-256 of the key an ``api_keys`` entry stands for (None: a
    malformed digest)."""
    if not entry.startswith(_DIGEST):
        return hashlib.sha256(entry.encode()).digest()
    try:
        raw = bytes.fromhex(entry[len(_DIGEST) :])
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def _entry_id(entry: str) -> str:
    """``key_id`` of the key an ``api_keys`` entry stands for."""
    return entry[len(_DIGEST) :][:24].lower() if entry.startswith(_DIGEST) else key_id(entry)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class SessionKeys:
    """Issues and verifies login and session tokens for a set of API keys
    (key, or ``sha256:<hex>`` of a key -> tenant or ``*``)."""

    def __init__(self, api_keys: Mapping[str, str]) -> None:
        """``api_keys``: the live mapping (the orchestrator withdraws a key
        from it when the registry rotates or deletes its tenant: that key's
        sessions end with it). An entry is a key or its digest
        (``sha256:<hex>``, a tenant created at run time): either opens the
        same sessions, signed under a secret derived from the key's digest."""
        self._keys = api_keys
        self._ids: dict[str, str] = {}  # key id -> entry of api_keys, for every entry seen

    def _found(self, kid: str) -> tuple[bytes, str] | None:
        """The digest of the key of that id and its scope, while it is configured."""
        entry = self._ids.get(kid)
        if entry is None or entry not in self._keys:  # index the entries not indexed yet
            for k in list(self._keys):
                self._ids[_entry_id(k)] = k
            entry = self._ids.get(kid)
        scope = self._keys.get(entry) if entry is not None else None
        digest = _digest(entry) if entry is not None else None
        return (digest, scope) if digest is not None and scope is not None else None

    def scope_of(self, key: str) -> str | None:
        """The scope of an API key (None: not a configured key or digest)."""
        if key.startswith(_DIGEST):  # a digest is not a key
            return None
        found = self._found(key_id(key))
        ok = found is not None and hmac.compare_digest(
            found[0], hashlib.sha256(key.encode()).digest()
        )
        return found[1] if found is not None and ok else None

    @staticmethod
    def _secret(digest: bytes) -> bytes:
        return hmac.new(digest, b"baton-console-session", hashlib.sha256).digest()

    def _sign(self, digest: bytes, body: str) -> str:
        return _b64(hmac.new(self._secret(digest), body.encode(), hashlib.sha256).digest())

    def issue(self, key: str, kind: Kind, *, nonce: str, expires: float) -> str:
        """A token of ``kind`` for a configured ``key``.

        Raises:
            KeyError: ``key`` is not a configured API key.
        """
        if self.scope_of(key) is None:
            raise KeyError("not a configured API key")
        return self.issue_for(key_id(key), kind, nonce=nonce, expires=expires)

    def issue_for(
        self, kid: str, kind: Kind, *, nonce: str, expires: float, scope: str | None = None
    ) -> str:
        """A token of ``kind`` for the configured key of id ``kid`` (a
        verified grant's ``key_id``, or ``key_id`` of a key ``scope_of``
        accepted): no plaintext key needed. ``scope``: the one that grant
        or key had.

        Raises:
            KeyError: no configured key has that id (any more), or not
                with ``scope``.
        """
        found = self._found(kid)
        if found is None or (scope is not None and found[1] != scope):
            raise KeyError("the key was withdrawn")
        digest, scope = found
        body = f"{kind}.{kid}.{scope}.{nonce}.{int(expires)}"
        return f"{body}.{self._sign(digest, body)}"

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
        want = self._sign(found[0], ".".join(parts[:5]))
        if not hmac.compare_digest(want, sig) or int(expires) <= now:
            return None
        return Grant(kind, kid, scope, nonce, float(expires))

    def csrf(self, grant: Grant) -> str:
        """The CSRF token of a session.

        Raises:
            KeyError: the grant's key was withdrawn since.
        """
        found = self._found(grant.key_id)
        if found is None:
            raise KeyError("the key was withdrawn")
        return self._sign(found[0], f"csrf.{grant.nonce}")

    def csrf_ok(self, grant: Grant, value: str | None) -> bool:
        try:
            return value is not None and hmac.compare_digest(self.csrf(grant), value)
        except KeyError:
            return False


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` header (absent: not a cross-site browser
    request) names the host it was sent to."""
    if origin is None:
        return True
    if host is None:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host
