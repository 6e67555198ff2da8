"""The context store's operations, independent of how requests arrive
(NATS request-reply in ``service.py``, the operator HTTP API in ``http.py``).

Every operation is tenant-scoped; refs are verified before anything is read
for them, and a ref's tenant must be the requester's.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton.bus import Bus
from proto.context_api import answer_target
from proto.errors import ErrorCode
from proto.messages import (
    ChatMessage,
    ContextAnswer,
    ContextAppend,
    ContextAppendReply,
    ContextFork,
    ContextRef,
    ContextSummarize,
    ForkOrigin,
    ForkReply,
    StoredAppend,
    Summary,
    WindowReply,
    WindowRequest,
)
from proto.sizes import MAX_CONTEXT_MESSAGE_BYTES, MAX_CONTEXT_RECORD_BYTES, MAX_FORK_DEPTH

from .counting import TokenCounter
from .errors import ContextError
from .history import HistoryStore, Session
from .refs import RefSigner
from .window import BudgetTooSmall, build_window

STRATEGIES = ("newest", "summary_tail")


@dataclass(frozen=True, slots=True)
class View:
    """A session as read: its fork's shared prefix followed by its own messages."""

    session: Session
    messages: list[ChatMessage]
    tokens: list[int]
    summary: Summary | None


def _check_sizes(messages: list[ChatMessage]) -> None:
    sizes = [len(m.content.encode()) for m in messages]
    if any(s > MAX_CONTEXT_MESSAGE_BYTES for s in sizes):
        raise ContextError(
            ErrorCode.MESSAGE_TOO_LARGE, f"a message is over {MAX_CONTEXT_MESSAGE_BYTES} bytes"
        )
    if sum(sizes) > MAX_CONTEXT_RECORD_BYTES:
        raise ContextError(
            ErrorCode.MESSAGE_TOO_LARGE, f"one append is over {MAX_CONTEXT_RECORD_BYTES} bytes"
        )


class ContextStore:
    def __init__(
        self,
        bus: Bus,
        history: HistoryStore,
        signer: RefSigner,
        counter: TokenCounter,
        default_budget: int,
    ) -> None:
        self.bus = bus
        self.history = history
        self.signer = signer
        self.counter = counter
        self.default_budget = default_budget

    # -- reading -----------------------------------------------------------

    async def view(
        self, tenant: str, session_id: str, *, at_least: int = 0, depth: int = 0
    ) -> View:
        """The session with its fork prefix resolved (not copied: the parent's
        cached lists are sliced per read)."""
        s = await self.history.load(tenant, session_id, at_least=at_least)
        if s.fork is None:
            return View(s, s.messages, s.tokens, s.summary)
        if depth >= MAX_FORK_DEPTH:
            raise ContextError(ErrorCode.BAD_REQUEST, f"forks nest deeper than {MAX_FORK_DEPTH}")
        parent = await self.view(tenant, s.fork.session, at_least=s.base, depth=depth + 1)
        if len(parent.messages) < s.base or parent.session.incarnation != s.fork.incarnation:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, "the session's fork parent is gone")
        summary = s.summary
        if summary is None and parent.summary is not None and parent.summary.covers <= s.base:
            summary = parent.summary
        return View(
            s,
            parent.messages[: s.base] + s.messages,
            parent.tokens[: s.base] + s.tokens,
            summary,
        )

    async def resolve(self, tenant: str, ref: ContextRef) -> View:
        """Verify ``ref`` for ``tenant`` and read the session up to it.

        Raises:
            ContextError: ``bad_ref`` (forged, altered), ``forbidden`` (another
                tenant's), ``unknown_session`` (no such session or version, or
                the session was erased since: the ref names an earlier incarnation).
        """
        if not self.signer.verify(ref):
            raise ContextError(ErrorCode.BAD_REF, "the context ref's signature does not verify")
        if ref.tenant != tenant:
            raise ContextError(ErrorCode.FORBIDDEN, "the ref belongs to another tenant")
        v = await self.view(ref.tenant, ref.session, at_least=ref.version)
        if v.session.incarnation != ref.incarnation:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, "the ref's session was erased")
        if ref.version <= 0 or len(v.messages) < ref.version:
            raise ContextError(ErrorCode.UNKNOWN_SESSION, "no such session or version")
        return v

    async def window(self, req: WindowRequest) -> WindowReply:
        if req.strategy not in STRATEGIES:
            raise ContextError(ErrorCode.BAD_REQUEST, f"strategy must be one of {STRATEGIES}")
        if req.budget_tokens < 0:
            raise ContextError(ErrorCode.BAD_REQUEST, "budget_tokens must not be negative")
        ref = req.ref
        v = await self.resolve(req.tenant, ref)
        reply = WindowReply()
        if req.done_msg_id is not None and req.done_msg_id in v.session.versions:
            done = v.session.versions[req.done_msg_id]
            reply.existing = v.messages[done - 1]
            reply.existing_ref = self.signer.sign(ref.tenant, ref.session, done, ref.incarnation)
            return reply
        summary = v.summary if req.strategy == "summary_tail" else None
        if summary is not None and summary.covers > ref.version:
            summary = None
        budget = req.budget_tokens or self.default_budget
        try:
            w = build_window(
                v.messages[: ref.version],
                v.tokens[: ref.version],
                budget,
                self.counter.count,
                summary,
            )
        except BudgetTooSmall as exc:
            raise ContextError(ErrorCode.BUDGET_TOO_SMALL, str(exc)) from exc
        reply.messages, reply.tokens, reply.dropped = w.messages, w.tokens, w.dropped
        reply.summarized = w.summarized
        return reply

    # -- writing -----------------------------------------------------------

    async def append(self, req: ContextAppend) -> ContextAppendReply:
        if not req.messages:
            raise ContextError(ErrorCode.BAD_REQUEST, "append needs at least one message")
        _check_sizes(req.messages)
        base = req.base
        if base is not None:
            if base.session != req.session:
                raise ContextError(ErrorCode.BAD_REQUEST, "base must be a ref to this session")
            await self.resolve(req.tenant, base)  # verified, and still that incarnation

        def build(s: Session) -> StoredAppend:
            if base is not None and s.incarnation != base.incarnation:
                raise ContextError(ErrorCode.UNKNOWN_SESSION, "the ref's session was erased")
            batch = list(req.messages)
            if s.length == 0 and req.system:
                batch.insert(0, ChatMessage(role="system", content=req.system))
            return StoredAppend(msg_id=req.msg_id, messages=batch)

        s, version, dup = await self.history.write(req.tenant, req.session, req.msg_id, build)
        ref = self.signer.sign(req.tenant, req.session, version, s.incarnation)
        return ContextAppendReply(ref=ref, length=s.length, duplicate=dup)

    async def answer(self, req: ContextAnswer) -> ContextAppendReply:
        """Append a worker's answer (``ContextAnswer``) and set its result's
        ``ref``; the NATS side publishes the result (``service.py``).

        Raises:
            ContextError: ``bad_request`` for a request ``answer_target``
                refuses (a result of another tenant, an error to append);
                else as ``append``.
        """
        try:
            target = answer_target(req)
        except ValueError as exc:
            raise ContextError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        append = ContextAppend(tenant=req.tenant, session=target.session,
                               msg_id=target.append_id, messages=[req.answer],
                               base=req.base)  # fmt: skip
        reply = await self.append(append)
        target.result.ref = reply.ref
        return reply

    async def summarize(self, req: ContextSummarize) -> ContextAppendReply:
        _check_sizes([ChatMessage(role="system", content=req.content)])
        v = await self.view(req.tenant, req.session)
        if not 1 <= req.covers <= len(v.messages):
            raise ContextError(ErrorCode.BAD_REQUEST, f"covers must be within 1..{len(v.messages)}")
        summary = Summary(covers=req.covers, content=req.content)
        s, _, dup = await self.history.write(
            req.tenant,
            req.session,
            req.msg_id,
            lambda _: StoredAppend(msg_id=req.msg_id, summary=summary),
        )
        ref = self.signer.sign(req.tenant, req.session, s.length, s.incarnation)
        return ContextAppendReply(ref=ref, length=s.length, duplicate=dup)

    async def fork(self, req: ContextFork) -> ForkReply:
        ref = req.ref
        await self.resolve(req.tenant, ref)
        if req.child == ref.session:
            raise ContextError(ErrorCode.BAD_REQUEST, "a session cannot be forked onto itself")
        if req.upto is not None and not 0 <= req.upto <= ref.version:
            raise ContextError(ErrorCode.BAD_REQUEST, f"upto must be 0..{ref.version}")
        version = ref.version if req.upto is None else req.upto
        origin = ForkOrigin(ref.session, version, ref.incarnation)
        # The parent notes the child first, so deleting the parent always
        # finds it. The child is not read first: a fork is nearly always onto
        # a session never written, and the child's own write is conditional.
        # (A note naming a session that turns out not to be this fork is
        # skipped by deletion, which only follows children forked from it.)
        note = f"fork:{req.child}"
        await self.history.write(
            req.tenant, ref.session, note, lambda _: StoredAppend(msg_id=note, child=req.child)
        )

        def build(s: Session) -> StoredAppend:
            if s.exists:
                raise ContextError(ErrorCode.CONFLICT, f"session {req.child!r} already exists")
            return StoredAppend(msg_id="fork", fork=origin)

        s, _, dup = await self.history.write(req.tenant, req.child, "fork", build)
        if s.fork != origin:
            raise ContextError(ErrorCode.CONFLICT, f"session {req.child!r} already exists")
        ref = self.signer.sign(req.tenant, req.child, version, s.incarnation)
        return ForkReply(ref=ref, duplicate=dup)
