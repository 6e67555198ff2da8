"""The connection a ``Bus`` holds: nats-py's client and JetStream context
(private: nothing outside ``baton.bus`` reaches them), stopping and closing."""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api


class BusCore:
    """The connection and the stop signal every part of the bus shares."""

    def __init__(
        self,
        nc: NATS,
        *,
        replicas: int = 1,
        api_prefix: str = api.DEFAULT_PREFIX,
        api_timeout: float = 5.0,
        js: JetStreamContext | None = None,
        home_region: str = "",
    ) -> None:
        self._nc = nc
        # The JetStream API's subject prefix: this account's own ($JS.API), or
        # another's imported under a prefix of its own (``Bus.account``).
        self._api_prefix = api_prefix
        self._js = js or nc.jetstream(prefix=api_prefix, timeout=api_timeout)
        self.replicas = replicas
        # BATON_HOME_REGION: every stream and bucket provisioned here without
        # a region of its own is placed on the servers tagged region:<it>.
        self.home_region = home_region
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask every ``consume`` loop to stop pulling."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def connected(self) -> bool:
        """Connected to a NATS server now (False while reconnecting)."""
        return bool(self._nc.is_connected)

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` was called."""
        await self._stopping.wait()

    async def flush(self, timeout: int = 2) -> None:
        """Wait until the server has seen everything sent so far (subscriptions
        included)."""
        await self._nc.flush(timeout=timeout)

    async def close(self, *, flush: bool = True) -> None:
        """Flush what was published (``flush``; pointless with NATS
        unreachable) and close. (Not ``drain``: nats-py waits out its whole
        drain timeout on a bound pull subscription.)"""
        self.stop()
        if flush:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def refresh_credentials(self, timeout: float = 10.0) -> None:
        """Reconnect now, presenting the ``.creds`` file as it is now (a
        re-issued user JWT with other permissions); back when connected.

        Raises:
            BusUnavailable: not connected again within ``timeout`` seconds.
        """
        from .errors import BusUnavailable

        await self._nc.force_reconnect()
        deadline = time.monotonic() + timeout
        await asyncio.sleep(0.01)
        while not self._nc.is_connected:
            if time.monotonic() > deadline:
                raise BusUnavailable("the server", TimeoutError("no reconnect"))
            await asyncio.sleep(0.05)
