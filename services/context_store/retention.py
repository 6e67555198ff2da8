"""Per-tenant retention: a sweeper erases sessions idle past their tenant's
max age.

A session's last activity is the timestamp JetStream gave its newest record
(read with a direct get of the last message on its subject), so no separate
metadata needs to be kept in step with the log. Every replica may sweep:
erasure is idempotent, so two sweeps of one session do no harm. An expired
session is deleted like a DELETE, forks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from proto.messages import ContextDelete

from .admin import Admin

log = structlog.get_logger("context_store.retention")


class Retention:
    """Max age per tenant: ``per_tenant`` overrides ``default`` (seconds, 0 = forever)."""

    def __init__(self, default: float = 0.0, per_tenant: dict[str, float] | None = None) -> None:
        self.default = default
        self.per_tenant = dict(per_tenant or {})

    def max_age(self, tenant: str) -> float:
        return self.per_tenant.get(tenant, self.default)

    @property
    def enabled(self) -> bool:
        return self.default > 0 or any(v > 0 for v in self.per_tenant.values())


async def sweep_once(admin: Admin, retention: Retention, now: float | None = None) -> int:
    """Erase every session past its tenant's max age; returns how many."""
    now = time.time() if now is None else now
    expired = 0
    for home in await admin.regions.homes():  # the shared stream and each region's
        found = await admin.bus.subjects(home.log.name, home.log_pattern())
        for subject in sorted(found):
            tenant, session = home.log_origin(subject)
            max_age = retention.max_age(tenant)
            if max_age <= 0:
                continue
            last = await admin.bus.last_msg(home.log.name, subject)
            if last is None:
                continue  # erased meanwhile
            if last.time is not None and now - last.time > max_age:
                await admin.delete(ContextDelete(tenant=tenant, session=session), actor="retention")
                expired += 1
    if expired:
        log.info("retention_swept", expired=expired)
    return expired


async def run_sweeper(admin: Admin, retention: Retention, every: float) -> None:
    """Sweep every ``every`` seconds until the bus stops."""
    if not retention.enabled:
        return
    while not admin.bus.stopping:
        try:
            await sweep_once(admin, retention)
        except Exception as exc:
            log.warning("retention_sweep_failed", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(admin.bus.wait_stopped(), every)
