"""Signed context refs: an HMAC over (tenant, session, version, incarnation).

A ref is ~50 bytes on the wire whatever the history's length. Only the
context store holds the key, so only it can issue or verify one. The
incarnation (the nonce of the session's first record) is signed too, so a
ref cannot be moved onto a later session written under the same id.
"""

from __future__ import annotations

import hashlib
import hmac

from proto.codec import encode
from proto.messages import ContextRef

SIG_BYTES = 16


class RefSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the context key must be at least 16 bytes")
        self._key = key

    def _mac(self, tenant: str, session: str, version: int, incarnation: bytes) -> bytes:
        body = encode((tenant, session, version, incarnation))
        return hmac.new(self._key, body, hashlib.sha256).digest()[:SIG_BYTES]

    def sign(self, tenant: str, session: str, version: int, incarnation: bytes) -> ContextRef:
        sig = self._mac(tenant, session, version, incarnation)
        return ContextRef(tenant, session, version, sig, incarnation)

    def verify(self, ref: ContextRef) -> bool:
        """True when ``ref`` was issued by a store holding this key, unaltered."""
        expected = self._mac(ref.tenant, ref.session, ref.version, ref.incarnation)
        return hmac.compare_digest(expected, ref.sig)
