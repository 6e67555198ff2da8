"""The bus's secrets on a laptop: one password per identity and the key that
encrypts JetStream at rest, kept in ``<data-dir>/secrets/nats.json`` (0600).

Production deployments do not use this file: their passwords (or nkeys/JWT
creds) come from secrets (``docs/security.md``). ``baton up`` writes one
client URL per tenant to ``<data-dir>/tenants/<tenant>.url`` and the
operator's to ``<data-dir>/operator.url``, each mode 0600 — a string any NATS
client can pass to ``connect()`` as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from baton import accounts

SECRETS_FILE = Path("secrets") / "nats.json"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (0600, in a 0700
    directory when it creates one): for files that hold secrets."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode otherwise


def create_private(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` (0600 from its first byte) unless it
    exists already: whole, never half-written, and processes that start
    together agree on the one that was created first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        with contextlib.suppress(FileExistsError):  # another process was first
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def new_secret(nbytes: int = 24) -> str:
    """A random secret that is safe in a URL and as a ``$VARIABLE`` value:
    nats-server parses a variable's value as a config token, so one that
    starts with a digit (``1e5...``) is read as a number and refused."""
    return "s" + secrets.token_hex(nbytes)


def client_url(user: str, password: str, host: str, port: int, scheme: str = "nats") -> str:
    return f"{scheme}://{user}:{password}@{host}:{port}"


@dataclass
class Credentials:
    """Passwords per identity plus the JetStream encryption key."""

    passwords: dict[str, str] = field(default_factory=dict)
    cipher_key: str = ""

    @classmethod
    def load_or_create(cls, data_dir: Path, tenants: Sequence[str]) -> Credentials:
        """Read the secrets file, adding a random password for every identity
        it lacks (existing ones are kept, so clients' URLs stay valid)."""
        path = Path(data_dir) / SECRETS_FILE
        creds = cls()
        if path.exists():
            doc = json.loads(path.read_text())
            creds = cls(
                passwords=dict(doc.get("passwords", {})), cipher_key=doc.get("cipher_key", "")
            )
        changed = False
        for identity in accounts.identities(tenants):
            if identity not in creds.passwords:
                creds.passwords[identity] = new_secret()
                changed = True
        if not creds.cipher_key:
            creds.cipher_key = new_secret(32)
            changed = True
        if changed or not path.exists():
            body = {"passwords": creds.passwords, "cipher_key": creds.cipher_key}
            write_private(path, json.dumps(body, indent=2))
        return creds

    def url(self, identity: str, host: str, port: int, scheme: str = "nats") -> str:
        return client_url(identity, self.passwords[identity], host, port, scheme)

    def write_urls(
        self, data_dir: Path, tenants: Sequence[str], host: str, port: int, scheme: str = "nats"
    ) -> dict[str, Path]:
        """Write each tenant's URL and the operator's; returns identity -> file."""
        out: dict[str, Path] = {}
        for tenant in tenants:
            path = Path(data_dir) / "tenants" / f"{tenant}.url"
            write_private(path, self.url(tenant, host, port, scheme) + "\n")
            out[tenant] = path
        path = Path(data_dir) / "operator.url"
        write_private(path, self.url(accounts.OPERATOR, host, port, scheme) + "\n")
        out[accounts.OPERATOR] = path
        return out


def read_url(data_dir: Path, tenant: str | None = None) -> str:
    """A URL ``baton up`` wrote: the tenant's, or the operator's for None.

    Raises:
        FileNotFoundError: no such file (the stack was not started with that tenant).
    """
    base = Path(data_dir)
    path = base / "operator.url" if tenant is None else base / "tenants" / f"{tenant}.url"
    return path.read_text().strip()
