"""Where a tenant's data lives: the servers' region tags, the check that a
region can hold a tenant's streams, and which servers hold each replica of
them (``baton tenant where``; docs/security.md, Residency).

Placement itself is pure data (``proto.streams.placed``); this module only
reads back what the servers did with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from baton import accounts
from baton.bus import Bus, NotFound
from proto import streams


class RegionError(RuntimeError):
    """A region too few servers carry (``server_tags``) to hold the tenant's streams."""


@dataclass(frozen=True)
class Replica:
    """A stream of a tenant and the servers holding its replicas."""

    stream: str
    account: str  # BATON (its task stream) or the tenant (its own account's copies)
    placement_tags: tuple[str, ...]
    servers: tuple[str, ...]  # the leader first


async def server_tags(sys_bus: Bus) -> dict[str, tuple[str, ...]]:
    """Server name -> its ``server_tags``, for every server that answers the
    system account's ping (``sys_bus``: a system user's) within a second."""
    tags: dict[str, tuple[str, ...]] = {}
    for raw in await sys_bus.gather_raw("$SYS.REQ.SERVER.PING"):
        server = json.loads(raw).get("server") or {}
        if server.get("name"):
            tags[str(server["name"])] = tuple(server.get("tags") or ())
    return tags


def region_holders(tags: dict[str, tuple[str, ...]], region: str) -> list[str]:
    """The servers tagged for ``region``."""
    (tag,) = streams.region_tags(region)
    return sorted(name for name, own in tags.items() if tag in own)


async def check_region(sys_bus: Bus, region: str, replicas: int) -> None:
    """Refuse a region fewer servers carry than each stream has replicas:
    its streams could never be placed.

    Raises:
        RegionError: saying which servers carry it and which were seen.
    """
    tags = await server_tags(sys_bus)
    holders = region_holders(tags, region)
    if len(holders) < replicas:
        raise RegionError(
            f"region {region!r}: {len(holders)} server(s) carry the tag "
            f"{streams.region_tags(region)[0]} ({', '.join(holders) or 'none'}; servers seen: "
            f"{', '.join(sorted(tags))}), and each stream has {replicas} replica(s): set "
            "server_tags on the region's servers (docs/security.md, Residency)"
        )


async def where(op_bus: Bus, tenant: str) -> tuple[Replica, ...]:
    """Each of the tenant's own streams (``proto.streams.tenant_streams``),
    its placement tags and the servers holding its replicas, from the
    servers' stream info (``op_bus``: the operator's, which reaches the
    tenant's JetStream through BATON's import)."""
    task, *copies = streams.tenant_streams(tenant)
    tenant_js = op_bus.account(accounts.tenant_api_prefix(tenant))
    out = []
    for spec, bus, account in [
        (task, op_bus, accounts.BATON_ACCOUNT),
        *((c, tenant_js, tenant) for c in copies),
    ]:
        info = await bus.stream_info(spec.name)
        out.append(Replica(spec.name, account, info.placement_tags, info.servers))
    return tuple(out)


async def context_where(op_bus: Bus, region: str) -> tuple[Replica, ...]:
    """The context store's stream pair holding the tenant's history and
    attachments (``proto.streams.context_home``): its region's
    ``BATON_CONTEXT_IN_<r>`` pair, shared by that region's tenants, or the
    shared ``BATON_CONTEXT`` pair. A pair the store has not made yet (no
    store has served the region) has no servers."""
    home = streams.context_home(region)
    out = []
    for spec in (home.log, home.attachments):
        try:
            info = await op_bus.stream_info(spec.name)
            out.append(
                Replica(spec.name, accounts.BATON_ACCOUNT, info.placement_tags, info.servers)
            )
        except NotFound:
            out.append(Replica(spec.name, accounts.BATON_ACCOUNT, spec.placement_tags, ()))
    return tuple(out)


def report(tenant: str, region: str, replicas: tuple[Replica, ...],
           tags: dict[str, tuple[str, ...]],
           context: tuple[Replica, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """The document ``baton tenant where --json`` prints and ``GET
    /v1/tenants/<t>/where`` answers: ``streams``, the tenant's own;
    ``context``, the context store's pair its history is in (shared)."""

    def rows(replicas: tuple[Replica, ...]) -> list[dict[str, Any]]:
        return [{"stream": r.stream, "account": r.account, "placement": list(r.placement_tags),
                 "servers": [{"name": s, "tags": list(tags.get(s, ()))} for s in r.servers]}
                for r in replicas]  # fmt: skip

    return {"tenant": tenant, "region": region or None, "streams": rows(replicas),
            "context": rows(context)}  # fmt: skip
