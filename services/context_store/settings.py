"""Context store settings (env ``BATON_*``)."""

from __future__ import annotations

import secrets

from pydantic import SecretStr

from baton import credentials
from baton.settings import CommonSettings


class ContextStoreSettings(CommonSettings):
    # Port of the context store's HTTP API.
    http_port: int = 8081
    # HMAC key for context refs. Only context stores hold it. When unset, a
    # random key is generated once and kept in ``<data_dir>/context.key``.
    context_key: SecretStr | None = None
    # Token budget of a context window when the request names none.
    default_budget_tokens: int = 2048
    # Sessions kept in memory (least recently used are evicted; NATS keeps all).
    cached_sessions: int = 2048
    # Context requests served at once; more wait.
    request_concurrency: int = 256
    # Max age of an idle session in seconds (0 = keep forever), and overrides
    # per tenant as JSON: BATON_RETENTION_PER_TENANT='{"acme": 2592000}'.
    retention_seconds: float = 0.0
    # Per-tenant overrides of BATON_RETENTION_SECONDS (JSON, see above).
    retention_per_tenant: dict[str, float] = {}
    # Seconds between retention sweeps.
    retention_sweep_interval: float = 60.0
    # A Hugging Face tokenizer directory (or tokenizer.json) for exact token
    # counts in windows; unset = a byte estimate.
    tokenizer: str | None = None

    def signing_key(self) -> bytes:
        """The HMAC key. Raises ValueError for a placeholder or a short key."""
        if self.context_key is not None:
            key = self.context_key.get_secret_value()
            if key.upper().startswith("REPLACE-ME") or len(key) < 16:
                raise ValueError("BATON_CONTEXT_KEY is a placeholder or shorter than 16 chars")
            return key.encode()
        path = self.data_dir / "context.key"
        if not path.exists():
            credentials.create_private(path, secrets.token_hex(32))
        return path.read_text().strip().encode()
