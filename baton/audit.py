"""The audit trail: who did what to which target, when, with what outcome.

Records (``proto.messages.AuditRecord``) go to ``baton.audit.<action>.<tenant>``
on stream ``BATON_AUDIT`` (400 days, deletes and purges denied). Services
write them with ``record``; operators read them with ``read`` — from the
``baton audit`` command, or ``GET /v1/audit`` on the context store's
operator API. Records never carry user text: ids, counts, outcomes.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

import msgspec

from baton.bus import Bus
from proto import codec, subjects
from proto.messages import AuditRecord
from proto.streams import AUDIT

# Actions Baton records (others may be added; the field is free text).
ERASE_SESSION = "erase_session"
ERASE_TENANT = "erase_tenant"
ERASE_TASKS = "erase_tasks"
CONSOLE_LOGIN = "console_login"


def entry(
    actor: str,
    action: str,
    target: str,
    *,
    outcome: str = "ok",
    tenant: str = "",
    service: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditRecord:
    """An ``AuditRecord`` stamped now."""
    return AuditRecord(actor=actor, action=action, target=target, outcome=outcome,
                       at=time.time(), tenant=tenant, service=service,
                       detail=detail or {})  # fmt: skip


async def record(bus: Bus, rec: AuditRecord, *, msg_id: str | None = None) -> bool:
    """Store ``rec`` durably (a JetStream publish: raises if it was not
    stored). ``msg_id``: False when a record with that id was stored within
    the stream's de-duplication window (60 s) — a once-only action's proof."""
    ack = await bus.publish(subjects.audit(rec.action, rec.tenant or None), rec, msg_id=msg_id)
    return not ack.duplicate


def subject_filter(tenant: str | None = None, action: str | None = None) -> str:
    return f"{subjects.AUDIT}.{action or '*'}.{tenant or '*'}"


async def read(
    bus: Bus, *, tenant: str | None = None, action: str | None = None, last: int = 100
) -> list[AuditRecord]:
    """The newest ``last`` records (oldest first), optionally for one tenant or action."""
    found: deque[AuditRecord] = deque(maxlen=max(1, last))
    async for msg in bus.read_subject(AUDIT.name, subject_filter(tenant, action)):
        try:
            found.append(codec.decode(msg.data, AuditRecord))
        except msgspec.DecodeError:
            continue
    return list(found)


async def print_trail(
    bus: Bus, *, tenant: str | None = None, action: str | None = None, last: int = 100
) -> None:
    """``baton audit``: the trail as JSON lines on stdout, oldest first."""
    for rec in await read(bus, tenant=tenant, action=action, last=last):
        print(json.dumps(msgspec.to_builtins(rec), sort_keys=True), flush=True)
