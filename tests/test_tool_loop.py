"""The durable tool loop on real processes (simulator engine): model → tool
calls (in parallel) → results in the session → model again, each call a
recorded sub-step with its own events; research over uploaded documents
with its code run in the sandbox; an MCP tool called with the model's
arguments."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from baton.bus import connect
from baton.dev.testing import Client, LocalStack, http_json, uid
from baton.documents import put_document
from baton.natsd import NatsServer
from proto.keys import fork_session
from proto.messages import ContextGet, DocumentPut
from tests.ctx import ask
from tests.harness import mcp_http_server

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


def tool_events(events: list[dict], tool: str | None = None) -> list[dict]:
    return [e for e in events if e["type"] == "step" and e.get("tool") and
            (tool is None or e["tool"] == tool)]  # fmt: skip


async def test_research_searches_the_documents_and_runs_its_code(
    stack: LocalStack, client: Client
) -> None:
    tenant, task_id = "acme", uid()
    bus = await connect(stack.nats_url, name="test-loop")
    try:
        await put_document(bus, DocumentPut(tenant=tenant, doc_id="raft", title="Raft",
                                            text="Raft elects a leader with randomized election timeouts."))  # fmt: skip
        await put_document(bus, DocumentPut(tenant=tenant, doc_id="cook", title="Soup",
                                            text="Simmer the onions for an hour."))  # fmt: skip
        question = "how does raft elect a leader"
        events = (
            await client.events(tenant, task_id, timeout=60)
            if await client.publish(
                "research",
                {"tenant": tenant, "input": question, "task_id": task_id},
                msg_id=task_id,
            )
            else []
        )
        done = events[-1]
        assert done["type"] == "completed", done
        search, python = tool_events(events, "search"), tool_events(events, "python")
        assert [e["status"] for e in search][:2] == ["started", "done"]
        assert [e["status"] for e in python][:2] == ["started", "done"]
        assert python[1]["outcome"] == "ok" and python[1]["seconds"] > 0
        assert done["usage"]["tool_cpu_seconds"] > 0  # the sandbox's CPU time is accounted

        # The retrieval branch: its second turn read a window holding the hits.
        branch = fork_session(tenant, task_id, "r1.gather.retrieval")
        h = await ask(bus, "get", ContextGet(tenant=tenant, session=branch))
        roles = [m.role for m in h.messages]
        i = roles.index("tool")
        assert h.messages[i - 1].tool_calls and h.messages[i - 1].tool_calls[0].name == "search"
        assert json.loads(h.messages[i - 1].tool_calls[0].arguments) == {"query": question}
        hits = json.loads(h.messages[i].content)["hits"]
        assert [x["doc_id"] for x in hits] == ["raft"] and "randomized" in hits[0]["snippet"]
        assert roles[i + 1] == "assistant" and not h.messages[i + 1].tool_calls  # then it answered

        # The validator reads the code's execution result (brought home at the fan-in).
        main = await ask(bus, "get", ContextGet(tenant=tenant, session=done["session"]))
        fan_in = " ".join(m.content for m in main.messages if m.role == "user")
        assert "[coding called python: ok]" in fan_in and question in fan_in
        assert "[retrieval called search: ok]" in fan_in

        run = http_json(f"{stack.orchestrator.url}/v1/tasks/{task_id}?tenant={tenant}")
        calls = run["steps"]["r1.gather.coding"]["calls"]
        assert list(calls) == ["t0c0"] and calls["t0c0"]["tool"] == "python"
    finally:
        await bus.close()


async def test_one_turn_calls_its_tools_in_parallel(own_nats: NatsServer, tmp_path: Path) -> None:
    flow = tmp_path / "flows"
    flow.mkdir()
    (flow / "both.yaml").write_text(
        "name: both\nagents:\n  a:\n    role: a\n    system: use both tools\n"
        "    tools: [search, python]\nsteps:\n  - id: go\n    agent: a\n"
    )
    log = tmp_path / "mcp.jsonl"
    mcp = contextlib.ExitStack()
    url = mcp.enter_context(mcp_http_server(log))
    (flow / "calc.yaml").write_text(
        "name: calc\nagents:\n  a:\n    role: a\n    system: add\n"
        "    tools: [mcp.web.add]\nsteps:\n  - id: go\n    agent: a\n"
    )
    servers = json.dumps({"web": {"url": url}})
    stack = LocalStack(own_nats.url, tmp_path / "s",
                       env={"BATON_WORKFLOWS_DIR": str(flow), "BATON_MCP_SERVERS": servers})  # fmt: skip
    stack.start(tool_workers=1)
    client = await Client.connect(own_nats.url)
    bus = await connect(own_nats.url, name="test-par")
    try:
        tenant, task_id = "acme", uid()
        done = await client.run(
            "both", {"tenant": tenant, "input": "print me", "task_id": task_id}, timeout=60
        )
        assert done["type"] == "completed", done
        events = await client.events(tenant, task_id)
        statuses = [(e["tool"], e["status"]) for e in tool_events(events)]
        # Both calls were dispatched before either answered: they ran in parallel.
        assert statuses[:2] == [("search", "started"), ("python", "started")]
        assert sorted(statuses[2:]) == [("python", "done"), ("search", "done")]

        # An MCP tool gets exactly the arguments the model produced.
        t2 = uid()
        done = await client.run(
            "calc", {"tenant": tenant, "input": "add", "task_id": t2}, timeout=60
        )
        assert done["type"] == "completed", done
        h = await ask(bus, "get", ContextGet(tenant=tenant, session=done["session"]))
        (asked,) = [m for m in h.messages if m.tool_calls]
        produced = json.loads(asked.tool_calls[0].arguments)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        assert calls == [{"tool": "add", "args": produced}]
        (result,) = [m for m in h.messages if m.role == "tool"]
        assert result.name == "mcp.web.add" and result.content == str(produced["a"] + produced["b"])
    finally:
        await bus.close()
        await client.close()
        stack.stop()
        mcp.close()
