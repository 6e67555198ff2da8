"""NATS decentralized authentication: nkeys, JWTs and ``.creds`` files.

An operator signs accounts, an account signs its users; nats-server (in
operator mode) trusts the operator's public key only. The tokens are JWTs
signed with ed25519 nkeys (``alg: ed25519-nkey``): header and claims in
base64url (no padding), the signature of ``header.claims`` likewise. Pure
apart from ``os.urandom``; no I/O. nats-io's ``nkeys`` does the keys and
signatures; the few lines of claims are here because the one JWT library on
PyPI (``nats-jwt``) calls itself untested and pins old dependencies
(``shared/notes/nats-jwt.md``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import nkeys

HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
OPERATOR: Final = "operator"
ACCOUNT: Final = "account"
USER: Final = "user"
_PREFIX: Final = {
    OPERATOR: nkeys.PREFIX_BYTE_OPERATOR,
    ACCOUNT: nkeys.PREFIX_BYTE_ACCOUNT,
    USER: nkeys.PREFIX_BYTE_USER,
}
UNLIMITED: Final = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip


def new_seed(kind: str) -> str:
    """A fresh nkey seed (``SO...``, ``SA...``, ``SU...``) for ``kind``."""
    return nkeys.encode_seed(os.urandom(32), _PREFIX[kind]).decode()


@dataclass(frozen=True)
class Key:
    """An nkey from its seed: signs, and names its holder by public key."""

    seed: str

    @property
    def public(self) -> str:
        return str(nkeys.from_seed(self.seed.encode()).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(self.seed.encode()).sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(signer: Key, subject: str, name: str, nats: dict[str, Any], *,
           iat: int | None = None, exp: int | None = None) -> str:  # fmt: skip
    """A JWT issued by ``signer`` about ``subject`` (a public key)."""
    claims: dict[str, Any] = {"iat": int(time.time()) if iat is None else iat,
                              "iss": signer.public, "name": name, "sub": subject,
                              "nats": {**nats, "version": 2}}  # fmt: skip
    if exp is not None:
        claims["exp"] = exp
    body = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    claims["jti"] = _b64(hashlib.sha256(body + os.urandom(8)).digest())
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{head}.{payload}.{_b64(signer.sign(f'{head}.{payload}'.encode()))}"


def _verify(public: str, data: bytes, sig: bytes) -> None:
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise ValueError(f"not a public nkey: {public[:8]}...")
    nacl.signing.VerifyKey(raw[1:33]).verify(data, sig)


def decode(token: str) -> dict[str, Any]:
    """The claims of ``token``, its signature checked against its issuer.

    Raises:
        ValueError: not a JWT, or a signature that does not verify.
    """
    try:
        head, payload, sig = token.split(".")
        claims: dict[str, Any] = json.loads(_unb64(payload))
        _verify(claims["iss"], f"{head}.{payload}".encode(), _unb64(sig))
    except (ValueError, KeyError, nkeys.NkeysError, nacl.exceptions.BadSignatureError) as exc:
        raise ValueError(f"not a valid NATS JWT: {exc}") from exc
    return claims


def operator_jwt(
    operator: Key, name: str, system_account: str, signing_keys: Sequence[str] = ()
) -> str:
    """The operator's self-signed JWT, naming the system account.
    ``signing_keys``: public operator nkeys whose account JWTs the server
    accepts as the operator's own (the identity key can then stay offline)."""
    nats: dict[str, Any] = {"type": "operator", "system_account": system_account}
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    return encode(operator, operator.public, name, nats)


def account_jwt(
    operator: Key,
    account: Key | str,
    name: str,
    *,
    jetstream: dict[str, int] | None = None,
    exports: Sequence[dict[str, Any]] = (),
    imports: Sequence[dict[str, Any]] = (),
    revocations: dict[str, int] | None = None,
    suspended: bool = False,
    signing_keys: Sequence[str] = (),
) -> str:
    """An account JWT signed by the operator (its identity key or one of its
    signing keys) about ``account`` (its key, or its public key alone).
    ``jetstream``: its JetStream limits (``disk_storage``, ``mem_storage``,
    ``streams``, ``consumer``; none: no JetStream); ``suspended``: no
    connection admitted (``conn: 0``); ``signing_keys``: public account nkeys
    that may sign its users besides its own."""
    limits: dict[str, Any] = dict(UNLIMITED)
    if jetstream:
        limits.update(jetstream)
    if suspended:
        limits["conn"] = 0
    nats: dict[str, Any] = {"type": "account", "limits": limits}
    if exports:
        nats["exports"] = list(exports)
    if imports:
        nats["imports"] = list(imports)
    if revocations:
        nats["revocations"] = dict(revocations)
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    subject = account if isinstance(account, str) else account.public
    return encode(operator, subject, name, nats)


def user_jwt(
    account: Key,
    user: Key,
    name: str,
    permissions: dict[str, Any] | None = None,
    *,
    iat: int | None = None,
    issuer_account: str | None = None,
) -> str:
    """A user JWT signed by its account, or by one of the account's signing
    keys: then ``issuer_account`` is the account's public key. ``permissions``
    in nats-server's configuration shape (``publish``/``subscribe`` ``allow``
    lists, ``allow_responses``); None: every subject of its account."""
    nats: dict[str, Any] = {"type": "user", "subs": -1, "data": -1, "payload": -1}
    if issuer_account is not None:
        nats["issuer_account"] = issuer_account
    if permissions is not None:
        nats["pub"] = {"allow": list(permissions.get("publish", {}).get("allow", []))}
        nats["sub"] = {"allow": list(permissions.get("subscribe", {}).get("allow", []))}
        if permissions.get("allow_responses"):
            nats["resp"] = {"max": 1, "ttl": 0}
    return encode(account, user.public, name, nats, iat=iat)


def creds(user_jwt_text: str, seed: str) -> str:
    """The standard ``.creds`` file every NATS client reads."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt_text}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def creds_jwt(text: str) -> str:
    """The user JWT inside a ``.creds`` file's text."""
    lines = [ln.strip() for ln in text.splitlines()]
    try:
        return lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    except (ValueError, IndexError) as exc:
        raise ValueError("not a .creds file") from exc


def creds_name(path: str | Path) -> str | None:
    """The ``name`` of the user in the ``.creds`` file at ``path``."""
    name = decode(creds_jwt(Path(path).read_text())).get("name")
    return name if isinstance(name, str) else None
