"""The orchestrator's follow of the tenant registry on a real nats-server:
a registered tenant is served however long its provisioning keeps failing
(it gave up after 60 tries, 30 s, and a cluster restart could outlast
that), and a tenant deleted meanwhile stops being tried."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from baton.bus import connect
from baton.natsd import NatsServer
from baton.tenants import (
    ACTIVE,
    DELETED,
    SUSPENDED,
    TenantKeys,
    TenantState,
    key_digest,
    live_keys,
)
from proto import streams
from services.orchestrator import service


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def test_a_new_tenant_is_served_after_many_failed_tries_and_a_deleted_one_is_dropped(
    own_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "ADD_RETRY", (0.005, 0.01))
    bus = await connect(own_nats.url, name="follow-tenants")
    kv = await bus.ensure_bucket(streams.TENANTS)
    tries: Counter[str] = Counter()
    known: set[str] = {"acme"}
    api_keys = {"bk-operator": "*"}

    async def add(t: str, region: str) -> None:
        tries[t] += 1
        if t == "gone" or tries[t] <= 80:  # more than the 60 tries it used to give up after
            raise RuntimeError(f"tenant {t}'s account is not reachable yet")
        known.add(t)

    intake = SimpleNamespace(suspended=set())
    keys = TenantKeys(api_keys, intake.suspended)
    follow = asyncio.create_task(
        service.follow_tenants(bus, intake, known, add, lambda: None, keys)  # type: ignore[arg-type]
    )
    try:
        now = time.time()
        digest = key_digest("bk-late")
        await kv.put("late", TenantState("late", ACTIVE, now, digest).encode())
        await kv.put("gone", TenantState("gone", ACTIVE, now).encode())
        await _until(lambda: "late" in known and api_keys.get(digest) == "late")
        assert tries["late"] == 81
        await kv.put("gone", TenantState("gone", DELETED, time.time()).encode())
        await asyncio.sleep(0.3)
        stopped = tries["gone"]
        await asyncio.sleep(0.3)
        assert tries["gone"] == stopped, "a deleted tenant is still being tried"
        assert "gone" not in known
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await bus.close()


async def test_the_registry_decides_a_tenants_http_key_once_it_holds_one(
    own_nats: NatsServer,
) -> None:
    """A tenant of BATON_TENANTS keeps its configured key until the registry
    holds a key for it (a rotation): from then on that one alone; a
    suspended tenant's key stays known (the API refuses it with 403
    ``tenant_suspended``), a deleted tenant's keys are all withdrawn."""
    bus = await connect(own_nats.url, name="follow-keys")
    kv = await bus.ensure_bucket(streams.TENANTS)
    known: set[str] = {"acme"}
    api_keys = {"bk-operator": "*", "bk-acme": "acme"}

    async def add(t: str, region: str) -> None:
        known.add(t)

    intake = SimpleNamespace(suspended=set())
    keys = TenantKeys(api_keys, intake.suspended)
    follow = asyncio.create_task(
        service.follow_tenants(bus, intake, known, add, lambda: None, keys)  # type: ignore[arg-type]
    )
    try:
        await kv.put("acme", TenantState("acme", ACTIVE, time.time()).encode())
        await asyncio.sleep(0.3)
        assert api_keys == {"bk-operator": "*", "bk-acme": "acme"}  # no key recorded: kept
        rotated = key_digest("bk-rotated")
        await kv.put("acme", TenantState("acme", ACTIVE, time.time(), rotated).encode())
        await _until(lambda: api_keys == {"bk-operator": "*", rotated: "acme"})
        await kv.put("acme", TenantState("acme", SUSPENDED, time.time(), rotated).encode())
        await _until(lambda: "acme" in intake.suspended)
        assert api_keys == {"bk-operator": "*", rotated: "acme"}
        await kv.put("acme", TenantState("acme", DELETED, time.time()).encode())
        await _until(lambda: api_keys == {"bk-operator": "*"})
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await bus.close()


def test_live_keys_is_the_one_rule_for_a_tenants_http_keys() -> None:
    """``live_keys`` (every service's rule, no broker): a configured key until
    the registry holds a digest, then that digest alone, and only once the
    tenant is served; a suspended tenant keeps its key (the API answers 403);
    a deleted one has none; with keys off, none is ever added."""
    configured = {"bk-op": "*", "bk-acme": "acme", "bk-acme2": "acme", "bk-beta": "beta"}
    new = key_digest("bk-new")
    assert live_keys("acme", configured, None) == {"bk-acme": "acme", "bk-acme2": "acme"}
    assert live_keys("acme", configured, TenantState("acme", ACTIVE, 1.0)) == {
        "bk-acme": "acme", "bk-acme2": "acme"}  # fmt: skip
    assert live_keys("acme", configured, TenantState("acme", ACTIVE, 2.0, new)) == {new: "acme"}
    assert live_keys("acme", configured, TenantState("acme", SUSPENDED, 3.0, new)) == {new: "acme"}
    assert live_keys("acme", configured, TenantState("acme", ACTIVE, 2.0, new), served=False) == {}
    assert live_keys("acme", configured, TenantState("acme", DELETED, 4.0)) == {}
    assert live_keys("acme", configured, TenantState("acme", DELETED, 4.0, new)) == {}
    assert live_keys("keyco", {}, TenantState("keyco", ACTIVE, 5.0, new)) == {}  # keys off


def test_a_services_keys_follow_each_registry_entry() -> None:
    """``TenantKeys.apply`` (every service's follow): the live mapping the
    HTTP API reads changed in place by ``live_keys``; suspended marked."""
    keys, suspended = {"bk-op": "*", "bk-acme": "acme"}, set[str]()
    tk = TenantKeys(keys, suspended)
    tk.apply(TenantState("acme", ACTIVE, 1.0))
    assert keys == {"bk-op": "*", "bk-acme": "acme"}
    new = key_digest("bk-new")
    tk.apply(TenantState("acme", SUSPENDED, 2.0, new))
    assert keys == {"bk-op": "*", new: "acme"} and suspended == {"acme"}
    tk.apply(TenantState("acme", ACTIVE, 3.0, new))
    assert suspended == set()
    tk.apply(TenantState("acme", DELETED, 4.0))
    assert keys == {"bk-op": "*"}
    tk.apply(TenantState("keyco", ACTIVE, 5.0, key_digest("bk-k")), served=False)
    assert keys == {"bk-op": "*"}  # not served yet
    tk.apply(TenantState("keyco", ACTIVE, 5.0, key_digest("bk-k")))
    assert keys == {"bk-op": "*", key_digest("bk-k"): "keyco"}
    off, none = {}, set[str]()
    TenantKeys(off, none).apply(TenantState("keyco", SUSPENDED, 6.0, key_digest("bk-k")))
    assert off == {} and none == {"keyco"}  # keys off stay off
