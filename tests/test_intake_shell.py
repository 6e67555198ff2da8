"""Intake on the bus twin: the real pull loop (``Bus.consume``, inherited by
the twin) gated by a tenant's fair share, the limiter's refusals, and the
conductor's hooks that free a slot when a run ends. On real processes:
``tests/test_fairness.py`` (a flood, rate limits, token shares)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from baton.bus import Consumption
from proto.streams import task_consumer
from services.orchestrator.conductor import Conductor
from services.orchestrator.intake import Intake, TenantRoom
from services.orchestrator.limits import Limiter, TenantLimits
from tests.test_conductor_shell import WORKFLOWS
from tests.twin_shell import RESULTS, TENANT, Shell


@pytest.fixture
async def shell() -> AsyncIterator[Shell]:
    s = await Shell.start(WORKFLOWS)
    yield s
    s.twin.stop()


async def _pulling(shell: Shell, limits: TenantLimits) -> Consumption:
    room = TenantRoom(Limiter(TenantLimits(), {TENANT: limits}), "count")
    old = shell.conductors[0]  # the same replica, built with the tenant's room
    c = shell.conductors[0] = Conductor(shell.twin, old.runs, old.workflows, old.s,
                                        clock=old.clock, check_limits=room.check,
                                        on_changed=room.changed)  # fmt: skip
    intake = Intake(shell.twin, c, room)
    return intake.run_tenant(task_consumer(TENANT), TENANT, concurrency=8)


async def _stop(shell: Shell, loop: Consumption) -> None:
    loop.stop()
    await asyncio.wait_for(loop, 5)


def _types(shell: Shell, task_id: str) -> list[str]:
    return [e["type"] for e in shell.events(task_id)]


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


async def test_a_tenant_at_its_share_waits_until_one_of_its_runs_ends(shell: Shell) -> None:
    loop = await _pulling(shell, TenantLimits(share=1))
    for t in ("t1", "t2", "t3"):
        await shell.submit("chat", t, "hello")
    await _until(lambda: "accepted" in _types(shell, "t1"))
    await asyncio.sleep(0.05)  # room for one run: the others stay in the stream
    assert _types(shell, "t2") == _types(shell, "t3") == []
    assert await shell.work() is not None and await shell.handle(RESULTS)
    assert _types(shell, "t1")[-1] == "completed"
    await _until(lambda: "accepted" in _types(shell, "t2"))  # its end let the next in
    await asyncio.sleep(0.05)
    assert _types(shell, "t3") == []
    await _stop(shell, loop)


async def test_tasks_behind_two_unfinished_ones_fail_rate_limited_with_a_retry_hint(
    shell: Shell,
) -> None:
    loop = await _pulling(shell, TenantLimits(max_in_flight=2))
    ids = [f"t{i}" for i in range(5)]
    for t in ids:  # in order: the limit is about submission order
        await shell.submit("chat", t, "hello")
    await _until(lambda: all(_types(shell, t) for t in ids))
    while await shell.work() is not None:
        await shell.handle(RESULTS)
    assert [_types(shell, t)[-1] for t in ids] == ["completed"] * 2 + ["failed"] * 3
    for t in ids[2:]:
        error = shell.events(t)[-1]["error"]
        assert error["code"] == "rate_limited" and error["retry_after"] > 0
    await _stop(shell, loop)
