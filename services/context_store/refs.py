"""Signed context refs: an HMAC over (tenant, session, version).

A ref is ~40 bytes on the wire whatever the history's length. Only the
context store holds the key, so only it can issue or verify one.
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

    def _mac(self, tenant: str, session: str, version: int) -> bytes:
        body = encode((tenant, session, version))
        return hmac.new(self._key, body, hashlib.sha256).digest()[:SIG_BYTES]

    def sign(self, tenant: str, session: str, version: int) -> ContextRef:
        return ContextRef(tenant, session, version, self._mac(tenant, session, version))

    def verify(self, ref: ContextRef) -> bool:
        """True when ``ref`` was issued by a store holding this key, unaltered."""
        expected = self._mac(ref.tenant, ref.session, ref.version)
        return hmac.compare_digest(expected, ref.sig)
