"""Session attachments: one immutable message per attachment on
``baton.ctxatt.<tenant>.<session>.<name>`` (stream ``BATON_CONTEXT_ATTACHMENTS``;
a tenant of a region on ``baton.region.<region>.ctxatt.…``, stream
``BATON_CONTEXT_ATTACHMENTS_IN_<region>``: the tenant's ``ContextHome``).

A stream rather than an Object Store bucket: a session's or a tenant's
attachments are found and erased with the same subject wildcards as its log,
with no tombstone left behind, and an attachment arrives in one request
(under NATS's 1 MiB payload), so chunking would buy nothing yet.
"""

from __future__ import annotations

from baton.bus import Bus, WrongLastSequence
from proto.streams import ContextHome

from .erase import erase_matching


class AttachmentExists(Exception):
    pass


async def put(
    bus: Bus, home: ContextHome, tenant: str, session: str, name: str, data: bytes, media_type: str
) -> None:
    """Store an attachment once. Raises ``AttachmentExists`` for a taken name."""
    try:
        await bus.publish_if_last(home.attachment_subject(tenant, session, name), data, 0,
                                  headers={"Content-Type": media_type})  # fmt: skip
    except WrongLastSequence as exc:
        raise AttachmentExists(name) from exc


async def get(bus: Bus, home: ContextHome, tenant: str, session: str, name: str) -> bytes | None:
    """The attachment's bytes, or None when there is none."""
    subject = home.attachment_subject(tenant, session, name)
    msg = await bus.last_msg(home.attachments.name, subject)
    return None if msg is None else msg.data or b""


async def names(bus: Bus, home: ContextHome, tenant: str, session: str) -> list[str]:
    found = await bus.subjects(home.attachments.name, home.attachment_pattern(tenant, session))
    return sorted(s.rsplit(".", 1)[1] for s in found)


async def count(bus: Bus, home: ContextHome, tenant: str, session: str | None = None) -> int:
    return len(await bus.subjects(home.attachments.name, home.attachment_pattern(tenant, session)))


async def erase(bus: Bus, home: ContextHome, tenant: str, session: str | None = None) -> int:
    """Erase a session's attachments (every session's when ``session`` is None)."""
    erased, _ = await erase_matching(
        bus, home.attachments.name, home.attachment_pattern(tenant, session)
    )
    return erased
