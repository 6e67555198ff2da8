"""Connecting: TLS, reconnects, a clear ``BusUnavailable`` when no server
answers, and the service's inbox prefix."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from pathlib import Path

import nats.errors
import structlog
from nats.aio.client import Client as NATS

from baton import jwt
from baton.accounts import SERVICES, inbox_prefix
from baton.metrics import PERMISSION_VIOLATIONS, register
from baton.urls import redact, split_creds

from .client import Bus
from .errors import BusUnavailable
from .flusher import coalesce_writes

log = structlog.get_logger("baton.bus")

PING_INTERVAL = 5  # seconds; see connect()


def tls_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """The client side of TLS to NATS, or None for a plain connection.

    ``ca`` verifies the server (without it: the system's CAs); ``cert`` and
    ``key`` are this client's certificate for a server that verifies clients.
    """
    if ca is None and cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def connect(
    url: str,
    *,
    name: str,
    replicas: int = 1,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    creds: str | Path | None = None,
    home_region: str = "",
) -> Bus:
    """Connect to NATS (reconnecting forever once connected), over TLS when
    ``tls`` is given (see ``tls_context``), as the user of the ``.creds`` file
    ``creds`` (or of the URL's ``?creds=``, ``baton.urls.split_creds``).
    ``home_region``: where the streams and buckets it provisions without a
    region of their own are placed (``BATON_HOME_REGION``).

    Raises:
        BusUnavailable: no server answered within ``timeout`` seconds.
    """

    url, in_url = split_creds(url)
    creds = creds or in_url
    user = urllib.parse.urlsplit(url).username
    if creds is not None:
        user = jwt.creds_name(creds)
    safe_url = redact(url)
    register(PERMISSION_VIOLATIONS)
    PERMISSION_VIOLATIONS.labels(name)  # the series exists from the start

    errors: list[Exception] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:  # the first connection's: told by BusUnavailable
            errors.append(exc)
            return
        if "permissions violation" in str(exc).lower():
            PERMISSION_VIOLATIONS.labels(name).inc()
            log.error("nats_permission_violation", error=str(exc))
            return
        log.warning("nats_error", error=repr(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected", url=safe_url)

    async def on_reconnect() -> None:
        log.info("nats_reconnected", url=safe_url)

    # nats-py retries an unreachable server forever when reconnects are on, so
    # the first connection is bounded here (its errors kept for the message).
    nc = NATS()
    coalesce_writes(nc)
    try:
        await asyncio.wait_for(
            nc.connect(
                # A cluster is a comma-separated list; nats-py also learns the
                # other nodes from the server and fails over among them.
                servers=[u.strip() for u in url.split(",") if u.strip()],
                name=name,
                # Replies to this service land under its own prefix, which
                # its permissions allow and no other identity's do.
                inbox_prefix=inbox_prefix(user) if user in SERVICES else "_INBOX",
                # A paused or partitioned server is noticed after ~3 missed
                # pings (default: 2 x 120 s, during which nothing moves).
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=3,
                connect_timeout=max(1, int(min(2.0, timeout))),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                tls=tls,
                user_credentials=str(creds) if creds is not None else None,
            ),
            timeout,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise BusUnavailable(safe_url, errors[-1] if errors else exc) from exc
    # nats-py upgrades to TLS only when the server's INFO asks for it: a
    # client configured for TLS refuses a server that does not.
    if tls is not None and not nc._server_info.get("tls_required"):
        await nc.close()
        refused = ConnectionError("TLS is configured but the server does not offer it")
        raise BusUnavailable(safe_url, refused)
    connected = True
    return Bus(nc, replicas=replicas, home_region=home_region)
