"""A stack for the run console's tests: API keys on (two tenants and an
operator), a slow worker pool for runs that last long enough to watch and
cancel, and workflows that wait for a human or break in a chosen layer."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.dev.testing import (
    INFERENCE_FAILURE_WORKFLOW,
    LocalStack,
    RefusingModelServer,
    refusing_worker,
    secure_nats,
    uid,
)
from baton.natsd import NatsServer

# The sim writes 40 tokens/s on the slow pool: a 600-token answer takes 15 s.
WORKFLOWS = {
    "ask.yaml": """
name: ask
description: A writer drafts, a human confirms, the writer finishes.
agents:
  writer: {role: writer, system: You write., max_tokens: 16}
steps:
  - id: draft
    agent: writer
  - id: confirm
    input: {prompt: "Ship this draft?", default: "yes", timeout: 300}
  - id: final
    agent: writer
""",
    "duo.yaml": """
name: duo
description: Two slow agents side by side.
agents:
  alpha: {role: alpha, system: You are alpha., max_tokens: 600, pool: slow}
  beta: {role: beta, system: You are beta., max_tokens: 600, pool: slow}
steps:
  - id: fan
    parallel: [alpha, beta]
""",
    "broken.yaml": INFERENCE_FAILURE_WORKFLOW,
}


@dataclass
class ConsoleEnv:
    stack: LocalStack
    server: NatsServer
    keys: dict[str, str]  # tenant (or "*") -> key

    @property
    def url(self) -> str:
        return self.stack.orchestrator.url

    def call(self, method: str, path: str, *, key: str | None = None, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:  # fmt: skip
        """An HTTP call with a bearer ``key``: (status, JSON body, headers)."""
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.url}{path}", data, hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, _json(r.read()), r.headers
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read()), exc.headers

    def submit(self, tenant: str, workflow: str, text: str, **kw: Any) -> str:
        task_id = uid("c")
        status, doc, _ = self.call("POST", "/v1/tasks", key=self.keys[tenant],
                                   body={"workflow": workflow, "input": text, "task_id": task_id,
                                         **kw})  # fmt: skip
        assert status == 202, doc
        return task_id

    def wait(self, tenant: str, task_id: str, until: Any, timeout: float = 60.0) -> dict[str, Any]:
        """Poll the task until ``until(doc)``; returns the doc."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, doc, _ = self.call("GET", f"/v1/tasks/{task_id}", key=self.keys[tenant])
            if status == 200 and until(doc):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"{task_id}: condition not met in {timeout}s; last {doc}")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def start_console_env(tmp: Path) -> Iterator[ConsoleEnv]:
    keys = {"acme": f"bk-{uid()}", "globex": f"bk-{uid()}", "*": f"bk-{uid()}"}
    api_keys = json.dumps({key: tenant for tenant, key in keys.items()})
    server = secure_nats(tmp / "nats", encrypt=False).start()
    stack = LocalStack(server, tmp / "stack", env={"BATON_API_KEYS": api_keys})
    stack.start(tool_workers=1, workflows=WORKFLOWS)
    refusing = RefusingModelServer()
    stack.worker(BATON_POOL="slow", BATON_SIM_DECODE_TPS="40").wait_ready()
    refusing_worker(stack, refusing).wait_ready()
    try:
        yield ConsoleEnv(stack, server, keys)
    finally:
        stack.stop()
        server.stop()
        refusing.stop()
