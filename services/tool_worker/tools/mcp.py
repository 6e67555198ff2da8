"""MCP servers as tools, through the official ``mcp`` SDK (docs/tools.md, "MCP
servers as tools"). One connection per server is held open by a task of its
own (the SDK's transports are anyio contexts that must be entered and left by
the same task); calls are handed to it and run concurrently."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog

from proto.errors import ErrorCode

from . import CallContext, ToolError, ToolOutput

log = structlog.get_logger("tool_worker")

PREFIX = "mcp"


def tool_name(server: str, tool: str) -> str:
    return f"{PREFIX}.{server}.{tool}"


def _text_of(result: Any) -> str:
    """A ``CallToolResult`` as text: its text blocks, else its structured content."""
    parts = [getattr(b, "text", None) for b in result.content or []]
    texts = [p for p in parts if isinstance(p, str)]
    if texts:
        return "\n".join(texts)
    if result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return ""


class McpServer:
    """One MCP server: a connection owned by one task, and its tools."""

    def __init__(self, name: str, config: dict[str, Any], connect_timeout: float = 20.0) -> None:
        if not ("url" in config) ^ ("command" in config):
            raise ValueError(f"MCP server {name!r}: give exactly one of 'url' or 'command'")
        self.name = name
        self.config = config
        self.connect_timeout = connect_timeout
        self.tools: dict[str, McpTool] = {}
        self._client: Any = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    def _target(self) -> Any:
        if "url" in self.config:
            return str(self.config["url"])
        from mcp.client.stdio import StdioServerParameters

        command = [str(c) for c in self.config["command"]]
        return StdioServerParameters(
            command=command[0], args=command[1:], env=self.config.get("env")
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._hold())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.connect_timeout)
        if self._client is None:
            log.warning("mcp_server_unavailable", server=self.name, error=repr(self._error))

    async def _hold(self) -> None:
        from mcp import Client

        try:
            async with Client(self._target()) as client:
                listed = await client.list_tools()
                for t in listed.tools:
                    schema = dict(t.input_schema or {"type": "object"})
                    tool = McpTool(self, t.name, t.description or "", schema)
                    self.tools[tool.name] = tool
                self._client = client
                self._ready.set()
                log.info("mcp_server_connected", server=self.name, tools=sorted(self.tools))
                await self._stop.wait()
        except Exception as exc:  # unreachable, or a protocol error
            self._error = exc
        finally:
            self._client = None
            self._ready.set()

    async def call(self, tool: str, args: dict[str, Any], timeout: float) -> Any:
        if self._client is None:
            raise ToolError(ErrorCode.TOOL_FAILED, f"MCP server {self.name!r} is not connected")
        return await asyncio.wait_for(self._client.call_tool(tool, args), timeout)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


class McpTool:
    """One tool of an MCP server, as ``mcp.<server>.<tool>``."""

    def __init__(
        self, server: McpServer, remote: str, description: str, parameters: dict[str, Any]
    ) -> None:
        self.server = server
        self.remote = remote
        self.name = tool_name(server.name, remote)
        self.description = description
        self.parameters = parameters

    async def run(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        try:
            result = await self.server.call(self.remote, args, ctx.timeout)
        except (ToolError, TimeoutError):
            raise
        except Exception as exc:
            raise ToolError(ErrorCode.TOOL_FAILED, f"MCP call failed: {exc}") from exc
        text = _text_of(result)
        if result.is_error:
            raise ToolError(ErrorCode.TOOL_FAILED, text or "the MCP tool reported an error")
        return ToolOutput(text)


async def connect_all(servers: dict[str, dict[str, Any]]) -> list[McpServer]:
    """Connect every configured server (concurrently)."""
    conns = [McpServer(name, cfg) for name, cfg in servers.items()]
    await asyncio.gather(*(c.start() for c in conns))
    return conns
