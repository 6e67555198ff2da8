"""Tool worker settings (env ``BATON_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from baton.settings import CommonSettings, default_worker_id


class ToolWorkerSettings(CommonSettings):
    # Port of /healthz, /readyz and /metrics.
    http_port: int = 8083
    # The tool pool this worker serves (it pulls baton.tools.<pool>).
    pool: str = "default"
    # This worker's name; a stable one keeps its search index file across restarts.
    worker_id: str = default_worker_id()
    # Calls run at once by this worker (each python call also takes a sandbox slot).
    concurrency: int = 32
    # A call not acked in this long is redelivered (to a peer if this worker
    # died); live calls are kept alive with in_progress.
    tool_ack_wait: float = 30.0
    # Seconds a call may run unless its job asks for less.
    tool_timeout: float = 20.0
    # The most any job may ask for.
    max_tool_timeout: float = 120.0
    # Which built-in tools this pool serves; MCP tools come with their servers.
    builtin_tools: list[str] = Field(default_factory=lambda: ["search", "python"])
    # MCP servers as tools, JSON: name -> {"url": "http://host/mcp"} or
    # {"command": ["prog", "arg"], "env": {...}}; tools become mcp.<name>.<tool>.
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The search index file (SQLite FTS5); unset = <data_dir>/search/<pool>-<worker_id>.sqlite.
    search_index: Path | None = None
    # Python sandbox: CPU seconds per call (RLIMIT_CPU).
    sandbox_cpu_seconds: int = 5
    # Python sandbox: address space per call (RLIMIT_AS), bytes.
    sandbox_memory_bytes: int = 512 * 2**20
    # Python sandbox: processes per slot (RLIMIT_NPROC and the slot cgroup's pids.max).
    sandbox_processes: int = 32
    # Python sandbox: stdout + stderr kept; more kills the program (tool_output_too_large).
    sandbox_output_bytes: int = 64 * 1024
    # Python sandbox: calls run at once, each as its own uid.
    sandbox_slots: int = 4
    # Python sandbox: slot i runs as uid and gid sandbox_uid_base + i (when the worker is root).
    sandbox_uid_base: int = 61000
    # Python sandbox: start each slot's next sandbox as its last call ends, so a
    # call finds the interpreter up (each sandbox still runs one call only).
    sandbox_spares: bool = True

    def index_path(self) -> Path:
        if self.search_index is not None:
            return self.search_index
        return Path(self.data_dir) / "search" / f"{self.pool}-{self.worker_id}.sqlite"
