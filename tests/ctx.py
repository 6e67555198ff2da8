"""Helpers for context store tests: typed requests on ``baton.ctx.<op>.<tenant>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from baton.bus import Bus
from proto import subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    ContextRef,
    WindowReply,
    WindowRequest,
)
from services.context_store.service import REQUEST_TYPES


async def ask(bus: Bus, op: str, body: Any, tenant: str | None = None) -> Any:
    """Send ``body`` to op ``op`` (for ``tenant``, default the body's) and decode the reply."""
    reply_type = REQUEST_TYPES[op][1]
    return await bus.request(subjects.context_api(op, tenant or body.tenant), body, reply_type)


async def append(
    bus: Bus, tenant: str, session: str, msg_id: str, *contents: str, system: str | None = None,
    role: str = "user",
) -> ContextAppendReply:  # fmt: skip
    msgs = [ChatMessage(role=role, content=c) for c in contents]
    req = ContextAppend(tenant=tenant, session=session, msg_id=msg_id, messages=msgs, system=system)
    reply: ContextAppendReply = await ask(bus, "append", req)
    assert reply.error is None, reply.error
    return reply


async def conversation(
    bus: Bus, tenant: str, session: str, turns: int, size: int = 200
) -> ContextRef:
    """A session with a system prompt and ``turns`` user/assistant pairs; its newest ref."""
    ref = (await append(bus, tenant, session, "t0", "q0 " + "x" * size, system="be brief")).ref
    for i in range(turns):
        if i:
            ref = (await append(bus, tenant, session, f"q{i}", f"q{i} " + "x" * size)).ref
        ref = (await append(bus, tenant, session, f"a{i}", f"a{i} " + "y" * size,
                            role="assistant")).ref  # fmt: skip
    assert ref is not None
    return ref


async def window(bus: Bus, tenant: str, ref: ContextRef, budget: int, **kw: Any) -> WindowReply:
    reply: WindowReply = await ask(
        bus, "window", WindowRequest(tenant=tenant, ref=ref, budget_tokens=budget, **kw)
    )
    return reply


def raw_store_contains(store_dir: Path, needle: bytes) -> list[Path]:
    """Files under a nats-server store directory whose bytes contain ``needle``."""
    return [p for p in store_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]
