"""Reading, attaching, erasing and counting: the context store's data
management operations (``get``, ``attach``, ``delete``, ``stats``). What a
delete erases (forks, attachments, a tenant's documents, in the shared
streams and every region's: ``regions.py``), the cache drop and the durable
announcement: docs/architecture.md, "Deletion" and "Erasure of tasks". A
delete is idempotent, so a failed announcement is retried by repeating the
delete."""

from __future__ import annotations

import time

import structlog

from baton import audit
from proto import subjects
from proto.errors import ErrorCode
from proto.messages import (
    AttachReply,
    ContextAttach,
    ContextDelete,
    ContextGet,
    ContextInvalidate,
    ContextStats,
    DeleteReply,
    DocumentsErased,
    GetReply,
    SessionsErased,
    StatsReply,
)
from proto.sizes import MAX_ATTACHMENT_BYTES, MAX_FORK_DEPTH, MAX_GET_PAGE
from proto.streams import DOCUMENTS, ContextHome

from . import attachments
from .erase import erase_matching
from .errors import ContextError
from .store import ContextStore

log = structlog.get_logger("context_store")


class Admin:
    def __init__(self, store: ContextStore) -> None:
        self.store = store
        self.bus = store.bus
        self.regions = store.history.regions

    async def home(self, tenant: str) -> ContextHome:
        """Where the tenant's sessions and attachments live."""
        return await self.regions.home(tenant)

    async def _existing(self, tenant: str, session: str) -> int:
        v = await self.store.view(tenant, session)
        if not v.session.exists:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, f"no session {session!r}")
        return len(v.messages)

    async def get(self, req: ContextGet) -> GetReply:
        if req.attachment is not None:
            home = await self.home(req.tenant)
            data = await attachments.get(self.bus, home, req.tenant, req.session, req.attachment)
            if data is None:
                raise ContextError(
                    ErrorCode.UNKNOWN_ATTACHMENT, f"no attachment {req.attachment!r}"
                )
            return GetReply(data=data)
        if req.start < 0 or not 1 <= req.limit <= MAX_GET_PAGE:
            raise ContextError(ErrorCode.BAD_REQUEST, f"start >= 0 and limit in 1..{MAX_GET_PAGE}")
        v = await self.store.view(req.tenant, req.session)
        if not v.session.exists:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, f"no session {req.session!r}")
        return GetReply(
            messages=v.messages[req.start : req.start + req.limit],
            length=len(v.messages),
            ref=self.store.signer.sign(
                req.tenant, req.session, len(v.messages), v.session.incarnation
            )
            if v.messages
            else None,
            fork=v.session.fork,
            summary=v.summary,
            attachments=await attachments.names(
                self.bus, await self.home(req.tenant), req.tenant, req.session
            ),
        )

    async def attach(self, req: ContextAttach) -> AttachReply:
        if len(req.data) > MAX_ATTACHMENT_BYTES:
            raise ContextError(
                ErrorCode.ATTACHMENT_TOO_LARGE,
                f"an attachment is over {MAX_ATTACHMENT_BYTES} bytes",
            )
        await self._existing(req.tenant, req.session)
        try:
            await attachments.put(self.bus, await self.home(req.tenant), req.tenant, req.session,
                                  req.name, req.data, req.media_type)  # fmt: skip
        except attachments.AttachmentExists as exc:
            raise ContextError(ErrorCode.CONFLICT, f"attachment {req.name!r} exists") from exc
        return AttachReply(size=len(req.data))

    async def delete(self, req: ContextDelete, actor: str = "bus") -> DeleteReply:
        """Erase; ``actor`` (who asked) goes to the audit trail."""
        reply = DeleteReply()
        erased: list[str] = []
        if req.session is None:
            for home in await self.regions.homes():  # wherever it lived, before a move
                sessions, records = await erase_matching(
                    self.bus, home.log.name, home.log_pattern(req.tenant)
                )
                reply.sessions += sessions
                reply.records += records
                reply.attachments += await attachments.erase(self.bus, home, req.tenant)
            reply.documents = await self._erase_documents(req.tenant)
        else:
            await self._delete_session(req.tenant, req.session, reply, erased, depth=0)
        await self.invalidate(req.tenant, req.session)
        log.info("context_deleted", sessions=reply.sessions, records=reply.records)
        await self.bus.publish(
            subjects.erased(req.tenant),
            SessionsErased(tenant=req.tenant, sessions=erased, whole_tenant=req.session is None,
                           actor=actor, at=time.time()),
        )  # fmt: skip
        action, target = (
            (audit.ERASE_TENANT, req.tenant)
            if req.session is None
            else (audit.ERASE_SESSION, f"{req.tenant}/{req.session}")
        )
        await audit.record(self.bus, audit.entry(
            actor, action, target, tenant=req.tenant, service="context-store",
            detail={"sessions": reply.sessions, "records": reply.records,
                    "attachments": reply.attachments, "forks": erased[1:]},
        ))  # fmt: skip
        return reply

    async def _delete_session(
        self, tenant: str, session: str, reply: DeleteReply, gone: list[str], depth: int
    ) -> None:
        gone.append(session)
        s = await self.store.history.load(tenant, session)
        if depth < MAX_FORK_DEPTH:
            for child in s.children:
                # Only a child forked from this session (a fork attempt onto
                # an existing session leaves a note but no fork).
                c = await self.store.history.load(tenant, child)
                if c.fork is not None and c.fork.session == session:
                    await self._delete_session(tenant, child, reply, gone, depth + 1)
        home = await self.home(tenant)
        reply.attachments += await attachments.erase(self.bus, home, tenant, session)
        log_subject = home.log_subject(tenant, session)
        # A session's log can be long: its count picks the cheaper way to find it.
        count = (await self.bus.subjects(home.log.name, log_subject)).get(log_subject, 0)
        erased = await self.bus.erase_subject(home.log.name, log_subject, count=count)
        reply.records += erased
        reply.sessions += 1 if erased else 0
        self.store.history.forget(tenant, session)

    async def _erase_documents(self, tenant: str) -> int:
        """The tenant's search documents: erased from the stream, then every
        tool worker is told to drop them from its index."""
        pattern = f"{subjects.DOCUMENTS}.{tenant}.*"
        _, erased = await erase_matching(self.bus, DOCUMENTS.name, pattern)
        await self.bus.notify(subjects.documents_erased(tenant), DocumentsErased(tenant=tenant))
        return erased

    async def invalidate(self, tenant: str, session: str | None) -> None:
        """Drop the cache here and tell every other replica to drop theirs."""
        self.store.history.forget(tenant, session)
        await self.bus.notify(
            subjects.context_invalidate(tenant), ContextInvalidate(tenant=tenant, session=session)
        )

    async def stats(self, req: ContextStats) -> StatsReply:
        home = await self.home(req.tenant)
        if req.session is None:
            logs = await self.bus.subjects(home.log.name, home.log_pattern(req.tenant))
            return StatsReply(
                sessions=len(logs),
                records=sum(logs.values()),
                attachments=await attachments.count(self.bus, home, req.tenant),
            )
        v = await self.store.view(req.tenant, req.session)
        if not v.session.exists:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, f"no session {req.session!r}")
        return StatsReply(
            sessions=1,
            records=len(v.session.versions),
            messages=len(v.messages),
            tokens=sum(v.tokens),
            attachments=await attachments.count(self.bus, home, req.tenant, req.session),
            last_activity=v.session.last_ts,
        )
