"""The context store's map of tenants to regions (``services/context_store/
regions.py``), against a stand-in for the bus: a tenant's region is read from
the registry before its first use, a region's pair is provisioned once (after
the store reconnected with its re-issued ``.creds`` when the region is new
since it started), and a move drops what the store cached for the tenant.
The registry listing a service starts with waits out JetStream without a
leader (a scripted JetStream)."""

from __future__ import annotations

from typing import Any

import nats.errors

from baton.bus import Bus, Entry
from baton.tenants import TenantState, read_registry
from proto import streams
from services.context_store.regions import TenantRegions


class _Registry:
    def __init__(self, regions: dict[str, str]) -> None:
        self.entries_ = {
            t: TenantState(t, "active", 1.0, "", r).encode() for t, r in regions.items()
        }
        self.gets: list[str] = []

    async def get(self, key: str) -> Entry | None:
        self.gets.append(key)
        value = self.entries_.get(key)
        return None if value is None else Entry(key, value, 1)

    async def entries(self, patient: bool = False) -> list[Entry]:
        return [Entry(k, v, 1) for k, v in self.entries_.items()]


class _Bus:
    def __init__(self, registry: _Registry | None) -> None:
        self.registry = registry
        self.provisioned: list[str] = []
        self.refreshed = 0

    async def open_bucket(self, spec: Any) -> _Registry | None:
        return self.registry

    async def provision(self, streams: Any = (), consumers: Any = ()) -> None:
        self.provisioned += [s.name for s in streams]

    async def refresh_credentials(self) -> None:
        self.refreshed += 1

    async def stream_names(self, subject: str) -> list[str]:
        return [*self.provisioned, "BATON_CONTEXT_IN_gone", "BATON_CONTEXT_ATTACHMENTS_IN_gone"]


async def test_a_tenant_region_is_read_before_its_first_use_and_its_pair_made_once() -> None:
    registry = _Registry({"euco": "eu", "plain": ""})
    bus = _Bus(registry)
    regions = TenantRegions(bus)  # type: ignore[arg-type]
    await regions.start()  # eu named by the registry: made with the .creds connected with
    assert bus.provisioned == ["BATON_CONTEXT_IN_eu", "BATON_CONTEXT_ATTACHMENTS_IN_eu"]
    assert bus.refreshed == 0
    assert await regions.home("euco") == streams.context_home("eu")
    assert await regions.home("plain") is streams.SHARED_CONTEXT
    # Unknown to the registry at start (created since): looked up once, then remembered.
    registry.entries_["usco"] = TenantState("usco", "active", 2.0, "", "us").encode()
    assert (await regions.home("usco")).log.name == "BATON_CONTEXT_IN_us"
    assert await regions.home("usco") == streams.context_home("us")
    assert registry.gets == ["usco"]
    assert bus.refreshed == 1  # us is new since start: the re-issued .creds first
    assert bus.provisioned[-2:] == ["BATON_CONTEXT_IN_us", "BATON_CONTEXT_ATTACHMENTS_IN_us"]
    assert await regions.home("nobody") is streams.SHARED_CONTEXT  # not in the registry
    # Every pair the server holds, for a whole-tenant erasure and the sweep.
    assert [h.region for h in await regions.homes()] == ["", "eu", "gone", "us"]


async def test_a_moved_tenant_is_forgotten_and_no_registry_means_the_shared_pair() -> None:
    regions = TenantRegions(_Bus(_Registry({"acme": ""})))  # type: ignore[arg-type]
    moved: list[str] = []
    regions.on_moved = moved.append
    assert await regions.home("acme") is streams.SHARED_CONTEXT
    regions._set("acme", "eu")
    regions._set("acme", "eu")
    assert moved == ["acme"]
    assert await regions.region("acme") == "eu"
    bare = TenantRegions(_Bus(None))  # type: ignore[arg-type]  # no registry bucket yet
    await bare.start()
    assert await bare.home("acme") is streams.SHARED_CONTEXT
    assert await TenantRegions(None).home("acme") is streams.SHARED_CONTEXT


async def test_the_registry_listing_a_service_starts_with_waits_out_jetstream_without_a_leader() -> (
    None
):
    """The context store (``TenantRegions.start``) and the orchestrator
    (``read_registry``) list the tenant registry as they start: a timeout
    while the cluster elects is retried, as opening the bucket is (without
    it the service exits 1 and a cluster restart stops it)."""
    reads: list[str] = []

    class Sub:
        async def consumer_info(self) -> Any:
            return type("Info", (), {"name": "c", "num_pending": 0})

        async def unsubscribe(self) -> None:
            pass

    class Js:
        async def key_value(self, name: str) -> object:
            return object()

        async def create_key_value(self, **kw: Any) -> object:
            return object()

        async def pull_subscribe(self, subject: str, **kw: Any) -> Sub:
            reads.append(subject)
            if len(reads) % 3:  # two timeouts, then the listing
                raise nats.errors.TimeoutError
            return Sub()

        async def delete_consumer(self, stream: str, name: str) -> None:
            pass

    bus = Bus(None, js=Js())  # type: ignore[arg-type]
    await TenantRegions(bus).start()
    assert reads == [streams.TENANTS.subject(">")] * 3
    assert await read_registry(bus) == {}
    assert len(reads) == 6
