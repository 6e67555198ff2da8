"""Two replicas changing one tenant at once, on a real nats-server in
operator mode: every registry write is a compare-and-set on the revision
read. Of two rotations racing, one wins and the other changes nothing and
says so (one set of keys live); a suspension overtaken by a rotation is
written again over the fresh entry (the rotation's key stays)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from baton.credentials import Credentials
from baton.natsd import NatsServer
from baton.tenants import (
    SUSPENDED,
    Created,
    TenantAdmin,
    TenantConflict,
    key_digest,
    open_keys,
    read_registry,
)

pytestmark = pytest.mark.timeout(120)

TENANT = "acme"


async def _connects(server: NatsServer, creds: Path) -> bool:
    try:
        nc = await nats.connect(
            server.address, user_credentials=str(creds), allow_reconnect=False, connect_timeout=2
        )
    except (TimeoutError, nats.errors.Error):
        return False
    await nc.close()
    return True


async def _entry(admin: TenantAdmin) -> Any:
    assert admin.op is not None
    return (await read_registry(admin.op))[TENANT]


async def test_of_two_rotations_racing_one_wins_and_the_loser_is_told(
    server: NatsServer, tmp_path: Path
) -> None:
    async with TenantAdmin(server.store_dir, server.address) as first:
        await first.rotate(TENANT)  # an entry in the registry to race on
    before = tmp_path / "before.creds"
    before.write_bytes(server.creds_for(TENANT).read_bytes())
    won: list[Created] = []
    winner = tmp_path / "winner.creds"
    async with (
        TenantAdmin(server.store_dir, server.address) as a,
        TenantAdmin(server.store_dir, server.address) as b,
    ):
        real_known = a._known

        async def overtaken(tenant: str, **kw: Any) -> str:
            state = await real_known(tenant, **kw)  # ``a`` has read the keys it rotates
            won.append(await b.rotate(tenant))
            winner.write_bytes(server.creds_for(tenant).read_bytes())
            return state

        a._known = overtaken  # type: ignore[method-assign]
        with pytest.raises(TenantConflict, match="changed while this step ran"):
            await a.rotate(TENANT)
        entry = await _entry(a)
    assert len(won) == 1
    # One set of keys: the winner's .creds, in the file, the secrets and the registry.
    assert server.creds_for(TENANT).read_bytes() == winner.read_bytes()
    creds = Credentials.load_or_create(server.store_dir, [])
    assert creds.nkeys[f"user:{TENANT}"] in winner.read_text()
    assert open_keys(creds, TENANT, entry.keys)[f"user:{TENANT}"] in winner.read_text()
    assert entry.api_key == key_digest(won[0].api_key)
    assert await _connects(server, winner)
    assert not await _connects(server, before)


async def test_a_suspension_overtaken_by_a_rotation_keeps_the_rotated_key(
    server: NatsServer,
) -> None:
    rotated: list[Created] = []
    async with (
        TenantAdmin(server.store_dir, server.address) as a,
        TenantAdmin(server.store_dir, server.address) as b,
    ):
        real_registry = a._registry

        async def registry() -> Any:
            kv = await real_registry()
            for name in ("put", "create", "update"):  # before ``a``'s first write
                write = getattr(kv, name)

                async def rotated_first(*args: Any, write: Any = write) -> Any:
                    if not rotated:
                        rotated.append(await b.rotate(TENANT))
                    return await write(*args)

                setattr(kv, name, rotated_first)
            return kv

        a._registry = registry  # type: ignore[method-assign]
        await a.suspend(TENANT)
        entry = await _entry(a)
        await b.resume(TENANT)
    assert len(rotated) == 1
    assert entry.state == SUSPENDED
    assert entry.api_key == key_digest(rotated[0].api_key)
    assert open_keys(Credentials.load_or_create(server.store_dir, []), TENANT, entry.keys) == {
        k: v
        for k, v in Credentials.load_or_create(server.store_dir, []).nkeys.items()
        if k in (f"account:{TENANT}", f"user:{TENANT}", f"revocations:{TENANT}")
    }
