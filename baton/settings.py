"""Settings shared by every service; each service subclasses ``CommonSettings``
with its own fields, so each process has exactly one settings object.

Every field reads from an environment variable ``BATON_<FIELD>``; the NATS
URL also honours plain ``NATS_URL``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    # The NATS server (nats://host:port; a comma-separated list for a
    # cluster). Its credentials: BATON_NATS_CREDS, or ?creds=/path in the URL.
    nats_url: str = Field(
        default=DEFAULT_NATS_URL,
        validation_alias=AliasChoices("BATON_NATS_URL", "NATS_URL"),
    )
    # This service's NATS .creds file (a user JWT and its nkey seed), for a
    # server in operator mode; `baton up` writes one per identity. The URL may
    # carry it instead as nats://host:port?creds=/path.
    nats_creds: Path | None = None
    # DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    # One JSON object per log line (false: human-readable lines).
    log_json: bool = True
    # Prompts and completions are customer data: logged only when asked for.
    log_prompts: bool = False
    # Address of the HTTP server (health, metrics, APIs).
    http_host: str = "127.0.0.1"
    # Its port; 0 = any free port (each service sets its own default).
    http_port: int = 0
    # Replicas of every JetStream stream Baton creates (3 on a NATS cluster).
    stream_replicas: int = 1
    # The region whose servers (server_tags region:<it>) hold every shared
    # stream and bucket, and each tenant without a region of its own;
    # existing ones are moved there. Empty: placed anywhere. With it, a
    # tenant of this region runs with every other region's servers down.
    home_region: str = ""
    # Local state: the generated context key, the models (models/), logs of `baton up`.
    data_dir: Path = Path(".data")
    # Seconds to wait for the first NATS connection.
    connect_timeout: float = 5.0
    # Seconds a stopping service (SIGTERM) waits for an unreachable NATS to
    # come back: unreachable this long in a row, it stops without settling
    # its in-flight work (JetStream redelivers it elsewhere) and exits 1.
    shutdown_grace: float = 10.0
    # HTTP API keys -> tenant (JSON in BATON_API_KEYS; "*" = operator, every
    # tenant). `baton up` writes them under the data dir. Empty: the
    # orchestrator and the context store refuse to start unless
    # BATON_ALLOW_NO_API_KEYS is set (and then serve loopback only).
    api_keys: dict[str, str] = Field(default_factory=dict)
    # Opt out of HTTP authentication (no BATON_API_KEYS): every local process
    # may then read and act on every tenant. Logged loudly at start.
    allow_no_api_keys: bool = False
    # TLS to NATS: a CA bundle that verifies the server (the connection then
    # requires TLS), plus a client certificate and key for a server that
    # verifies clients (mutual TLS). Paths to PEM files.
    nats_tls_ca: Path | None = None
    # The client certificate for mutual TLS (PEM); needs BATON_NATS_TLS_KEY.
    nats_tls_cert: Path | None = None
    # The client certificate's private key (PEM); needs BATON_NATS_TLS_CERT.
    nats_tls_key: Path | None = None

    @model_validator(mode="after")
    def _client_cert_needs_its_key(self) -> CommonSettings:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("BATON_NATS_TLS_CERT and BATON_NATS_TLS_KEY go together: set both")
        if self.home_region:
            from proto.ids import require_id

            require_id(self.home_region, "BATON_HOME_REGION")
        return self


def parse_tenants(value: str) -> list[str]:
    """``"acme, globex"`` -> ``["acme", "globex"]`` (each a valid id, no repeats).

    Raises:
        ValueError: an id outside ``[A-Za-z0-9_-]{1,64}`` or a reserved name.
    """
    from baton.accounts import check_tenant

    out = [check_tenant(t.strip()) for t in value.split(",") if t.strip()]
    return list(dict.fromkeys(out))


def default_worker_id() -> str:
    """A worker's name when none is set: the host's name (made id-safe) and the pid."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}"
