"""Cache-aware routing on real processes: a session's turns stay on the
worker whose prefix cache holds it; a warm worker that dies never blocks a
step (simulator engine; the vLLM hit-rate comparison is in `make bench`)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.dev.testing import Client, LocalStack, metric, uid
from baton.natsd import NatsServer

FAST_FAILOVER = {"BATON_PEER_STALE_AFTER": "2", "BATON_ROUTE_STALE_AFTER": "1.5"}


@pytest.fixture
def two_workers(own_nats: NatsServer, tmp_path: Path) -> Iterator[LocalStack]:
    s = LocalStack(own_nats, tmp_path / "s", env=FAST_FAILOVER)
    s.workdir.mkdir(parents=True)
    for name in ("context-store", "orchestrator"):
        s.service(name).wait_ready()
    s.worker().wait_ready()
    s.worker().wait_ready()
    yield s
    s.stop()


def _worker_of(stack: LocalStack, tenant: str, task_id: str) -> str:
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"
    with urllib.request.urlopen(url, timeout=5) as r:
        steps = json.loads(r.read())["steps"]
    return str(steps["r1.answer"]["worker"])


async def test_a_sessions_turns_stay_on_its_warm_worker_and_survive_its_death(
    two_workers: LocalStack, own_client: Client
) -> None:
    stack, tenant, session = two_workers, "initech", uid("s")
    served = []
    for turn in range(4):
        task_id = uid()
        done = await own_client.run("chat", {"tenant": tenant, "input": f"turn {turn}",
                                          "task_id": task_id, "session": session})  # fmt: skip
        assert done["type"] == "completed"
        served.append(_worker_of(stack, tenant, task_id))
    assert len(set(served)) == 1, served  # every turn on the warm worker
    assert metric(stack.orchestrator.url, "baton_routing_decisions_total", decision="warm") >= 3

    warm = next(p for p in stack.procs if p.env.get("BATON_WORKER_ID") == served[0])
    warm.kill()  # the orchestrator still believes it alive for a moment
    task_id = uid()
    done = await own_client.run("chat", {"tenant": tenant, "input": "after the crash",
                                      "task_id": task_id, "session": session}, timeout=40)  # fmt: skip
    assert done["type"] == "completed"
    assert _worker_of(stack, tenant, task_id) != served[0]
    assert done["output"].startswith("[sim: 10 messages")  # the whole history, by pointer
