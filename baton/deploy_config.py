"""NATS configuration and credentials for a container deployment, from the
same source as ``baton up`` (``baton.accounts``).

``python -m baton.deploy_config compose DATA_DIR PORT TENANT...`` writes, into
DATA_DIR: ``nats.conf`` (accounts, per-service users, JetStream encrypted at
rest, listening on 0.0.0.0 inside the container; it names every secret as a
``$VARIABLE`` and holds none, so the container's non-root user may read it),
``nats.env`` (0600: those variables — passwords and the encryption key — for
the NATS container, and every service's ``BATON_NATS_URL_<SERVICE>``), and
each tenant's client URL in ``tenants/<tenant>.url`` plus ``operator.url``,
for NATS published on 127.0.0.1:PORT. Secrets are kept across runs (``secrets/nats.json``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from baton import accounts
from baton.credentials import Credentials
from baton.natsd import CIPHER_ENV
from baton.settings import parse_tenants


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def service_var(service: str) -> str:
    """``inference-worker`` -> ``BATON_NATS_URL_INFERENCE_WORKER``."""
    return "BATON_NATS_URL_" + service.upper().replace("-", "_")


def password_var(identity: str) -> str:
    """The variable that carries ``identity``'s password into nats-server."""
    return "BATON_NATS_PW_" + identity.upper().replace("-", "_")


def write_compose(data_dir: Path, tenants: list[str], port: int, host: str = "nats") -> None:
    """Write the files the compose stack mounts and reads (see the module doc)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = Credentials.load_or_create(data_dir, tenants)
    names = {i: accounts.Var(password_var(i)) for i in accounts.identities(tenants)}
    config = accounts.render(
        tenants, names, host="0.0.0.0", port=4222, store_dir="/data",
        monitor_port=8222, server_name="baton-nats", cipher_key=accounts.Var(CIPHER_ENV),
    )  # fmt: skip
    conf = data_dir / "nats.conf"
    conf.write_text(accounts.to_conf(config) + "\n")
    conf.chmod(0o644)
    lines = [f"{CIPHER_ENV}={creds.cipher_key}", f"BATON_TENANTS={','.join(tenants)}"]
    lines += [f"{password_var(i)}={creds.passwords[i]}" for i in names]
    lines += [f"{service_var(s)}={creds.url(s, host, 4222)}" for s in accounts.SERVICES]
    _private(data_dir / "nats.env", "\n".join(lines) + "\n")
    creds.write_urls(data_dir, tenants, "127.0.0.1", port)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "compose":
        print("usage: python -m baton.deploy_config compose DATA_DIR PORT TENANT...",
              file=sys.stderr)  # fmt: skip
        return 2
    tenants = parse_tenants(",".join(argv[3:]) or "acme")
    write_compose(Path(argv[1]), tenants, int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
