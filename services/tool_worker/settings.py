"""Tool worker settings (env ``BATON_*``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import Field

from baton.settings import CommonSettings


def _default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}"


class ToolWorkerSettings(CommonSettings):
    http_port: int = 8083
    pool: str = "default"
    worker_id: str = _default_worker_id()
    # Calls run at once by this worker (each python call also takes a sandbox slot).
    concurrency: int = 32
    # A call that is not answered in this long is redelivered (to a peer if this
    # worker died); live calls are kept alive with in_progress.
    tool_ack_wait: float = 30.0
    tool_timeout: float = 20.0  # default per call; a job may ask for less
    max_tool_timeout: float = 120.0
    # Which tools this pool serves: built-ins by name, MCP tools come with their servers.
    builtin_tools: list[str] = Field(default_factory=lambda: ["search", "python"])
    # name -> {"url": "http://host/mcp"} | {"command": ["prog", "arg"], "env": {...}}
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The search index (SQLite FTS5); unset = <data_dir>/search/<pool>-<worker_id>.sqlite
    search_index: Path | None = None
    # Python sandbox limits.
    sandbox_cpu_seconds: int = 5
    sandbox_memory_bytes: int = 512 * 2**20
    sandbox_processes: int = 32
    sandbox_output_bytes: int = 64 * 1024
    sandbox_slots: int = 4
    sandbox_uid_base: int = 61000

    def index_path(self) -> Path:
        if self.search_index is not None:
            return self.search_index
        return Path(self.data_dir) / "search" / f"{self.pool}-{self.worker_id}.sqlite"
