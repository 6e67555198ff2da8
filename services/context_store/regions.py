"""Where each tenant's histories and attachments live: its region, read from
the tenant registry (bucket ``baton-tenants``, written by ``baton tenant``) and
followed as it changes, mapped to streams and subjects by
``proto.streams.context_home`` — the one map every part of the store uses.

A tenant without a region (or one the registry does not know: a
``BATON_TENANTS`` tenant never given one) keeps the shared ``BATON_CONTEXT``
pair; a tenant of region ``eu`` the ``BATON_CONTEXT_IN_eu`` pair, placed on
the servers tagged ``region:eu``. A tenant not seen yet is looked up in the
registry before its first read or write, so a tenant created with a region
never writes outside it, even before the watch reports it.

A region's pair is provisioned when a tenant of it is first served. The
store's user JWT names each region's streams (``baton.accounts``): a region
new since this process connected comes with re-issued ``.creds``
(``baton tenant create --region``), so the store reconnects with them first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from baton.bus import Bucket, Bus
from baton.tenants import DELETED, TenantState
from proto import streams, subjects
from proto.streams import ContextHome, context_home

log = structlog.get_logger("context_store.regions")

WATCH_RETRY = 2.0  # seconds between tries to follow a registry not there yet


class TenantRegions:
    """tenant -> its ``ContextHome``; ``follow`` keeps it current."""

    def __init__(self, bus: Bus | None) -> None:
        # None: every tenant in the shared pair (a store without a registry, in tests).
        self.bus = bus
        self._region: dict[str, str] = {}
        self._ready: set[str] = {""}  # regions whose pair is provisioned ("" = the shared one)
        self._bucket: Bucket | None = None
        self._lock = asyncio.Lock()
        self._refresh = False  # a new region needs the re-issued .creds (after start)
        self._early: dict[str, asyncio.Task[None]] = {}  # provisioning as the registry names it
        self.on_moved: Callable[[str], None] = lambda tenant: None
        # Each registry entry as read (the store's HTTP API keys follow it).
        self.on_entry: Callable[[TenantState], None] = lambda entry: None

    async def _registry(self) -> Bucket | None:
        """The registry bucket, or None while there is none (then no tenant
        has a region: ``baton tenant`` and the orchestrator make it first)."""
        if self._bucket is None and self.bus is not None:
            self._bucket = await self.bus.open_bucket(streams.TENANTS)
        return self._bucket

    async def start(self) -> None:
        """Provision the pair of every region the registry names (the
        ``.creds`` this process connected with cover them)."""
        registry = await self._registry()
        for e in await registry.entries(patient=True) if registry is not None else []:
            if e.value and not e.deleted:
                entry = TenantState.decode(e.key, e.value)
                self._region[e.key] = entry.region
                self.on_entry(entry)
        for region in sorted(set(self._region.values()) - self._ready):
            try:
                await self._provision(region)
            except Exception as exc:  # its tenants' first request tries again
                log.error("context_region_unavailable", region=region, error=repr(exc))
        self._refresh = True

    async def _provision(self, region: str) -> ContextHome:
        home = context_home(region)
        async with self._lock:
            if region not in self._ready:
                assert self.bus is not None
                if self._refresh:
                    await self.bus.refresh_credentials()
                await self.bus.provision(streams=[home.log, home.attachments])
                self._ready.add(region)
                log.info("context_region_ready", region=region, stream=home.log.name)
        return home

    async def region(self, tenant: str) -> str:
        """The tenant's region ("" for none), from the registry on first sight."""
        region = self._region.get(tenant)
        if region is None:
            registry = await self._registry()
            entry = await registry.get(tenant) if registry is not None else None
            state = TenantState.decode(tenant, entry.value) if entry is not None else None
            region = state.region if state is not None and state.state != DELETED else ""
            self._region.setdefault(tenant, region)
            region = self._region[tenant]
        return region

    async def home(self, tenant: str) -> ContextHome:
        """Where ``tenant``'s histories and attachments are read and written."""
        region = await self.region(tenant)
        return context_home(region) if region in self._ready else await self._provision(region)

    async def homes(self) -> list[ContextHome]:
        """Every pair: the shared one, each provisioned here, and every
        regional one the server holds (made by another replica or an earlier
        run). A whole-tenant erasure and the retention sweep cover them all."""
        regions = set(self._ready)
        if self.bus is not None:
            found = await self.bus.stream_names(f"{subjects.REGION}.*.>")
            regions |= {n.removeprefix(streams.CONTEXT_IN) for n in found
                        if n.startswith(streams.CONTEXT_IN)}  # fmt: skip
        return [context_home(r) for r in sorted(regions)]

    def _set(self, tenant: str, region: str) -> None:
        old = self._region.get(tenant)
        self._region[tenant] = region
        if old is not None and old != region:
            # Only a tenant with no history moves (``baton tenant region``):
            # whatever is cached for it was read from its old pair.
            log.info("context_tenant_moved", tenant=tenant, old=old or None, region=region or None)
            self.on_moved(tenant)

    def _provision_early(self, region: str) -> None:
        """Provision a region as soon as the registry names it (before its
        tenant's first request), beside the watch: once at a time, and a
        failure (``.creds`` not re-issued yet) only logged — the tenant's
        requests try again."""
        running = self._early.get(region)
        if running is not None and not running.done():
            return

        async def provision() -> None:
            try:
                await self._provision(region)
            except Exception as exc:
                log.error("context_region_unavailable", region=region, error=repr(exc))

        self._early[region] = asyncio.create_task(provision())

    async def follow(self) -> None:
        """Follow the registry until cancelled: each tenant's region as it changes."""
        while True:
            try:
                registry = await self._registry()
                if registry is None:
                    await asyncio.sleep(WATCH_RETRY)
                    continue
                async for e in registry.follow(inactive_threshold=30.0):
                    if e.deleted or not e.value:
                        continue
                    state = TenantState.decode(e.key, e.value)
                    self.on_entry(state)
                    region = "" if state.state == DELETED else state.region
                    self._set(e.key, region)
                    if region not in self._ready:
                        self._provision_early(region)
            except asyncio.CancelledError:
                for task in self._early.values():
                    task.cancel()
                raise
            except Exception as exc:
                log.warning("context_registry_watch_failed", error=repr(exc))
                await asyncio.sleep(WATCH_RETRY)
