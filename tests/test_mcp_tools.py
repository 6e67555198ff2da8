"""MCP servers as tools: a real MCP server (built with the official SDK, in
its own process) behind a real tool worker, over streamable HTTP and stdio."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.bus import Bus
from baton.dev.testing import LocalStack, uid
from proto import codec
from proto.messages import ContextGet, ToolCatalog
from proto.streams import TOOL_CATALOG
from tests.ctx import ask
from tests.harness import MCP_SERVER, mcp_http_server
from tests.tools import call_tool, session_with_call


@pytest.fixture(scope="module")
def mcp_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("mcp") / "calls.jsonl"
    with mcp_http_server(log) as url:
        yield url, log


@pytest.fixture(scope="module")
def mcp_pool(
    stack: LocalStack, mcp_http: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Path]]:
    url, http_log = mcp_http
    stdio_log = tmp_path_factory.mktemp("mcp-stdio") / "calls.jsonl"
    servers = {
        "web": {"url": url},
        "local": {"command": [sys.executable, str(MCP_SERVER), "stdio"],
                  "env": {"MCP_CALL_LOG": str(stdio_log)}},
    }  # fmt: skip
    pool = uid("mcp")
    proc = stack.tool_worker(BATON_POOL=pool, BATON_MCP_SERVERS=json.dumps(servers),
                             BATON_BUILTIN_TOOLS="[]").wait_ready()  # fmt: skip
    yield pool, http_log, stdio_log
    stack.retire(proc)


async def test_every_mcp_tool_is_offered_with_its_input_schema(
    bus: Bus, mcp_pool: tuple[str, Path, Path]
) -> None:
    pool = mcp_pool[0]
    kv = await bus.ensure_bucket(TOOL_CATALOG)
    catalog = codec.decode((await kv.get(pool)).value, ToolCatalog)
    tools = {t.name: t for t in catalog.tools}
    names = {
        f"mcp.{server}.{tool}"
        for server in ("web", "local")
        for tool in ("add", "define", "pause", "lookup")
    }
    assert set(tools) == names
    schema = json.loads(tools["mcp.web.add"].parameters)
    assert schema["required"] == ["a", "b"] and schema["properties"]["a"]["type"] == "integer"
    assert tools["mcp.local.define"].description == "Look a word up in a tiny glossary."


@pytest.mark.parametrize("server", ["web", "local"])
async def test_an_mcp_tool_gets_the_arguments_and_its_result_is_in_the_history(
    bus: Bus, mcp_pool: tuple[str, Path, Path], server: str
) -> None:
    pool, http_log, stdio_log = mcp_pool
    log = http_log if server == "web" else stdio_log
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    res = await call_tool(
        bus, tenant, session, ref, f"mcp.{server}.add", {"a": 20, "b": 22}, pool=pool
    )
    assert res.outcome == "ok", res.error
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"tool": "add", "args": {"a": 20, "b": 22}} in calls
    h = await ask(bus, "get", ContextGet(tenant=tenant, session=session))
    last = h.messages[-1]
    assert (last.role, last.name, last.content) == ("tool", f"mcp.{server}.add", "42")


async def test_an_mcp_tool_error_and_bad_arguments_reach_the_agent(
    bus: Bus, mcp_pool: tuple[str, Path, Path]
) -> None:
    pool = mcp_pool[0]
    tenant, session = uid("acme"), uid("s")
    ref = await session_with_call(bus, tenant, session)
    err = await call_tool(
        bus, tenant, session, ref, "mcp.web.define", {"word": "zebra"}, pool=pool, call="e"
    )
    assert err.outcome == "tool_failed" and "no entry for 'zebra'" in err.error.message
    bad = await call_tool(
        bus, tenant, session, ref, "mcp.web.add", {"a": "one"}, pool=pool, call="b"
    )
    assert bad.outcome == "bad_tool_arguments"  # checked against the server's schema first
