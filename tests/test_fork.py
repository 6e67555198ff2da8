"""Fork from a step, on real processes: ``POST /v1/tasks/{id}/fork`` (and
``baton fork``) starts a new run of the same workflow from a finished step of
an old one; the steps before it are carried over, not run again (the worker
does only the new steps' jobs), the step reads the edit on a fork of the
session, and the old run is left as it was."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from baton.dev.testing import Client, LocalStack, http_json, metric, uid
from tests.harness import http_post

RESEARCH_INPUT = "compare two sorting algorithms"  # the simulated validator accepts it


def _status(stack: LocalStack, tenant: str, task_id: str) -> dict[str, Any]:
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}"
    return http_json(url)  # type: ignore[no-any-return]


async def _finished(stack: LocalStack, tenant: str, task_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = _status(stack, tenant, task_id)
        if doc["status"] != "running":
            return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{task_id} still running after {timeout}s")


def _model_turns(doc: dict[str, Any], *, carried: bool) -> int:
    return sum(st["turn"] + 1 for st in doc["steps"].values()
               if st["agent"] and st["carried"] == carried)  # fmt: skip


async def test_a_fork_from_validate_runs_only_validate_and_after_on_a_forked_session(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid("old")
    end = await client.run("research", {"tenant": tenant, "task_id": task_id,
                                        "input": RESEARCH_INPUT}, timeout=60)  # fmt: skip
    assert end["type"] == "completed", end
    old = _status(stack, tenant, task_id)
    jobs_before = metric(stack.procs[2].url, "baton_worker_jobs_total", outcome="completed")

    new_id = uid("fork")
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}/fork?tenant={tenant}"
    got = http_post(url, {"step": "r1.validate", "input": "check the edge cases too",
                          "task_id": new_id}, 202)  # fmt: skip
    assert got["task_id"] == new_id and got["forked_from"] == task_id
    assert sorted(got["carried"]) == ["r1.gather.coding", "r1.gather.retrieval", "r1.plan"]
    new = await _finished(stack, tenant, new_id)
    assert new["status"] == "completed", new
    assert (new["forked_from"], new["forked_at"]) == (task_id, "r1.validate")

    for step in got["carried"]:  # carried as they were: same worker, same times
        a, b = old["steps"][step], new["steps"][step]
        assert b["carried"] and (b["worker"], b["finished_at"], b["output"]) == (
            a["worker"], a["finished_at"], a["output"])  # fmt: skip
    ran = new["steps"]["r1.validate"]
    assert not ran["carried"] and ran["dispatched_at"] > old["updated_at"]
    assert ran["context"]["session"] == new_id  # on the fork of the old session
    assert old["steps"]["r1.validate"]["context"]["session"] == task_id
    # The worker did the new steps' jobs, none of the carried steps'.
    jobs_after = metric(stack.procs[2].url, "baton_worker_jobs_total", outcome="completed")
    # (validate and the summary, or more rounds when the simulated validator revises)
    assert jobs_after - jobs_before == _model_turns(new, carried=False) >= 2
    assert _model_turns(new, carried=True) >= 3
    # The old run is untouched, and the new one's usage is only what it spent.
    assert _status(stack, tenant, task_id)["updated_at"] == old["updated_at"]
    assert new["usage"]["completion_tokens"] == sum(
        st["usage"]["completion_tokens"] for st in new["steps"].values() if not st["carried"]
    )

    # Its events tell the carried steps as done, then the new ones.
    events = await client.events(tenant, new_id)
    steps = [(e["step"], e["status"]) for e in events if e["type"] == "step" and "call" not in e]
    assert ("r1.plan", "done") in steps and steps.index(("r1.plan", "done")) < steps.index(
        ("r1.validate", "started"))  # fmt: skip


async def test_the_same_fork_again_is_a_duplicate_and_bad_forks_are_clear_errors(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid("old")
    await client.run("chat", {"tenant": tenant, "task_id": task_id, "input": "hi"}, timeout=30)
    url = f"{stack.orchestrator.url}/v1/tasks/{task_id}/fork?tenant={tenant}"
    new_id = uid("fork")
    first = http_post(url, {"step": "r1.answer", "input": "hello instead", "task_id": new_id}, 202)
    again = http_post(url, {"step": "r1.answer", "input": "hello instead", "task_id": new_id}, 202)
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    new = await _finished(stack, tenant, new_id)
    assert new["status"] == "completed"
    bad = http_post(url, {"step": "r7.answer"}, 400)
    assert bad["error"]["code"] == "invalid_field" and bad["error"]["param"] == "step"
    taken = http_post(url, {"step": "r1.answer", "task_id": task_id}, 409)
    assert taken["error"]["code"] == "conflict"
    missing = http_post(f"{stack.orchestrator.url}/v1/tasks/{uid()}/fork?tenant={tenant}",
                        {"step": "r1.answer"}, 404)  # fmt: skip
    assert missing["error"]["code"] == "unknown_task"


def test_baton_fork_prints_the_new_task(stack: LocalStack) -> None:
    async def one() -> str:
        c = await Client.connect(stack.nats_url)
        try:
            task_id = uid("old")
            await c.run("chat", {"tenant": "cli", "task_id": task_id, "input": "hi"}, timeout=30)
            return task_id
        finally:
            await c.close()

    task_id = asyncio.run(one())
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "fork", task_id, "r1.answer", "--input", "again",
         "--tenant", "cli", "--api-url", stack.orchestrator.url, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["forked_from"] == task_id and doc["carried"] == []
