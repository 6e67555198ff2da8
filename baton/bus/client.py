"""``Bus``: the one door to NATS every service holds, composed of its
parts in one line of inheritance, each a module of one concern (``core``
→ ``streams`` → ``messaging`` → ``consume`` → ``provision``)."""

from __future__ import annotations

from .errors import TRANSIENT
from .provision import Provisioning


class Bus(Provisioning):
    """A connected NATS client plus JetStream, shared by one service process."""

    def account(self, api_prefix: str, *, timeout: float = 5.0) -> Bus:
        """This connection speaking to another account's JetStream, whose API
        this account imports under ``api_prefix`` (a tenant's copy of its
        events): provisioning and the stream and erase helpers work there too."""
        return Bus(
            self._nc,
            replicas=self.replicas,
            api_prefix=api_prefix,
            api_timeout=timeout,
            home_region=self.home_region,
        )

    async def reaches_account(self, api_prefix: str, timeout: float = 2.0) -> bool:
        """True when another account's JetStream answers under ``api_prefix``
        (one try: a NATS without that import has nothing to wait for)."""
        try:
            await self.account(api_prefix, timeout=timeout)._js.account_info()
        except TRANSIENT:
            return False
        return True
