"""Session histories on JetStream, with an in-process cache.

Each append is one record on ``baton.ctxlog.<tenant>.<session>`` (stream
``BATON_CONTEXT``), written with ``Nats-Expected-Last-Subject-Sequence`` so
several store replicas append in one order: a replica whose cache is behind
gets a sequence mismatch, reads the tail it missed, and retries. The cache is
only an accelerator; the stream is the truth.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import nats.js.errors
from nats.js import api

from baton.transport import Bus
from proto import codec, subjects
from proto.messages import ChatMessage, StoredAppend
from proto.streams import CONTEXT

_WRONG_LAST_SEQ = 10071


def estimate_tokens(message: ChatMessage) -> int:
    """Cheap token estimate (~4 bytes a token + per-message overhead)."""
    return len(message.content.encode()) // 4 + 4


@dataclass
class Session:
    messages: list[ChatMessage] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # group msg_id -> history length right after that append
    versions: dict[str, int] = field(default_factory=dict)
    last_seq: int = 0  # last stream sequence applied (0 = none)

    def apply(self, record: StoredAppend, seq: int) -> None:
        if record.msg_id not in self.versions:
            self.messages.extend(record.messages)
            self.tokens.extend(estimate_tokens(m) for m in record.messages)
            self.versions[record.msg_id] = len(self.messages)
        self.last_seq = seq


class HistoryStore:
    """Append and read session histories."""

    def __init__(self, bus: Bus, *, cached_sessions: int = 2048) -> None:
        self.bus = bus
        self._cache: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._cached = cached_sessions

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _remember(self, key: tuple[str, str], session: Session) -> None:
        self._cache[key] = session
        self._cache.move_to_end(key)
        while len(self._cache) > self._cached:
            old, _ = self._cache.popitem(last=False)
            self._locks.pop(old, None)

    async def _read_tail(self, tenant: str, session_id: str, session: Session) -> None:
        """Apply every record of the session after ``session.last_seq``."""
        subject = subjects.context_log(tenant, session_id)
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=10.0,
            mem_storage=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
            if session.last_seq
            else api.DeliverPolicy.ALL,
            opt_start_seq=session.last_seq + 1 if session.last_seq else None,
        )
        sub = await self.bus.js.pull_subscribe(subject, stream=CONTEXT.name, config=config)
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            while pending > 0:
                batch = await sub.fetch(batch=min(pending, 256), timeout=2.0)
                for msg in batch:
                    session.apply(
                        codec.decode(msg.data, StoredAppend), msg.metadata.sequence.stream
                    )
                pending = batch[-1].metadata.num_pending if batch else 0
        finally:
            await sub.unsubscribe()

    async def load(self, tenant: str, session_id: str, *, at_least: int = 0) -> Session:
        """The session, read from the stream where the cache is missing or behind."""
        key = (tenant, session_id)
        async with self._lock(key):
            session = self._cache.get(key)
            if session is None:
                session = Session()
                await self._read_tail(tenant, session_id, session)
            elif len(session.messages) < at_least:
                await self._read_tail(tenant, session_id, session)
            self._remember(key, session)
            return session

    async def append(
        self,
        tenant: str,
        session_id: str,
        msg_id: str,
        messages: list[ChatMessage],
        system: str | None = None,
    ) -> tuple[Session, int, bool]:
        """Append atomically; returns (session, version after it, duplicate)."""
        key = (tenant, session_id)
        subject = subjects.context_log(tenant, session_id)
        session = await self.load(tenant, session_id)
        async with self._lock(key):
            for _ in range(20):
                if msg_id in session.versions:
                    return session, session.versions[msg_id], True
                batch = list(messages)
                if not session.messages and system:
                    batch.insert(0, ChatMessage(role="system", content=system))
                record = StoredAppend(msg_id=msg_id, messages=batch, ts=time.time())
                try:
                    ack = await self.bus.js.publish(
                        subject,
                        codec.encode(record),
                        headers={
                            "Nats-Msg-Id": f"{tenant}.{session_id}.{msg_id}",
                            "Nats-Expected-Last-Subject-Sequence": str(session.last_seq),
                        },
                    )
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST_SEQ:
                        raise
                    await self._read_tail(tenant, session_id, session)
                    continue
                if ack.duplicate:  # stored earlier under this id: read it back
                    await self._read_tail(tenant, session_id, session)
                    continue
                session.apply(record, ack.seq)
                return session, len(session.messages), False
        raise RuntimeError(f"append to {tenant}/{session_id} kept racing other writers")
