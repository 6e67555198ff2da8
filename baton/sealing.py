"""Sealing a value under a 32-byte key: XChaCha20-Poly1305 (PyNaCl, which
nkeys brings), a random 24-byte nonce per seal, and associated data naming
what the value is, so a sealed value cannot be passed off as another's.
Used for the run entries (``services/orchestrator/runkeys.py``) and for the
tenants' keys in the registry (``baton.tenants``)."""

from __future__ import annotations

import os

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_KEYBYTES,
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
)

SEALED = b"\x01"  # never the first byte of a msgpack map (a plain run entry)
_NONCE = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
KEY_BYTES = crypto_aead_xchacha20poly1305_ietf_KEYBYTES


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seal(key: bytes, name: str, data: bytes) -> bytes:
    """``data`` sealed under ``key``, bound to ``name`` (its associated data)."""
    nonce = os.urandom(_NONCE)
    box = crypto_aead_xchacha20poly1305_ietf_encrypt(data, name.encode(), nonce, key)
    return SEALED + nonce + box


def is_sealed(value: bytes) -> bool:
    return value[:1] == SEALED


def unseal(key: bytes, name: str, value: bytes) -> bytes:
    """The plain value; raises ``nacl.exceptions.CryptoError`` for a wrong
    key, another name's value or a changed byte."""
    nonce, box = value[1 : 1 + _NONCE], value[1 + _NONCE :]
    return crypto_aead_xchacha20poly1305_ietf_decrypt(box, name.encode(), nonce, key)
