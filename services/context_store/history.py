"""Session logs on JetStream, with an in-process cache.

Each write is one ``StoredAppend`` record on ``baton.ctxlog.<tenant>.<session>``
(stream ``BATON_CONTEXT``; a tenant of a region on
``baton.region.<region>.ctxlog.<tenant>.<session>``, stream
``BATON_CONTEXT_IN_<region>``: ``regions.py``), published with
``Nats-Expected-Last-Subject-Sequence`` so several store replicas write in one
order: a replica whose cache is behind gets a sequence mismatch, reads the
tail it missed, and retries. That same check makes writes idempotent by
``msg_id``: a retried write finds its record in the tail and reports a
duplicate. (No ``Nats-Msg-Id``: the server would remember erased ids for its
duplicate window and refuse to store a session written again after deletion.)

A session's first record carries a random ``incarnation`` nonce, which refs
sign: erased and written again, the same session id is a new incarnation.
The first record is read back once stored (``_first_of``): a leader change
can store it twice.

The cache is only an accelerator; the stream is the truth. A replica drops
a session on a ``baton.ctxinval.<tenant>`` broadcast after a deletion, and a
cached session whose subject was purged underneath it is detected (the tail
read finds nothing new) and read again from scratch.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from baton.bus import Bus, WrongLastSequence
from proto import codec
from proto.messages import ChatMessage, ForkOrigin, StoredAppend, Summary

from .counting import estimate_tokens
from .regions import TenantRegions

log = structlog.get_logger("context_store.history")

INCARNATION_BYTES = 8
Key = tuple[str, str]


@dataclass
class Session:
    """One session's own records, folded. Versions are absolute: a fork's
    own messages start at ``base`` (the length of the prefix it shares)."""

    messages: list[ChatMessage] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # msg_id -> length after it
    fork: ForkOrigin | None = None
    children: list[str] = field(default_factory=list)
    summary: Summary | None = None
    last_seq: int = 0  # last stream sequence applied (0 = none)
    last_ts: float = 0.0
    incarnation: bytes = b""  # nonce of the first record (b"" for sessions older than nonces)

    @property
    def base(self) -> int:
        return self.fork.version if self.fork else 0

    @property
    def length(self) -> int:
        return self.base + len(self.messages)

    @property
    def exists(self) -> bool:
        return self.last_seq > 0

    def apply(self, record: StoredAppend, seq: int, count: Callable[[ChatMessage], int]) -> None:
        if not self.exists and record.incarnation:
            self.incarnation = record.incarnation
        if record.msg_id not in self.versions:
            if record.fork is not None and not self.exists:
                self.fork = record.fork
            if record.child is not None and record.child not in self.children:
                self.children.append(record.child)
            if record.summary is not None:
                self.summary = record.summary
            self.messages.extend(record.messages)
            self.tokens.extend(count(m) for m in record.messages)
            self.versions[record.msg_id] = self.length
        self.last_seq, self.last_ts = seq, max(self.last_ts, record.ts)


Build = Callable[[Session], StoredAppend]


class HistoryStore:
    """Read and write session logs."""

    def __init__(
        self,
        bus: Bus,
        *,
        cached_sessions: int = 2048,
        count: Callable[[ChatMessage], int] = estimate_tokens,
        regions: TenantRegions | None = None,
    ) -> None:
        self.bus = bus
        # Where each tenant's sessions live (None: every tenant in the shared stream).
        self.regions = regions or TenantRegions(None)
        self.count = count
        self._cache: OrderedDict[Key, Session] = OrderedDict()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._cached = cached_sessions

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _remember(self, key: Key, session: Session) -> None:
        self._cache[key] = session
        self._cache.move_to_end(key)
        while len(self._cache) > self._cached:
            old, _ = self._cache.popitem(last=False)
            self._locks.pop(old, None)

    def forget(self, tenant: str, session_id: str | None = None) -> None:
        """Drop cached sessions: one, or every session of ``tenant``."""
        for key in [k for k in self._cache if k[0] == tenant]:
            if session_id is None or key[1] == session_id:
                del self._cache[key]

    async def _read_tail(self, tenant: str, session_id: str, session: Session) -> int:
        """Apply every record after ``session.last_seq``; returns how many."""
        home = await self.regions.home(tenant)
        subject = home.log_subject(tenant, session_id)
        start = session.last_seq + 1 if session.last_seq else 0
        applied = 0
        async for msg in self.bus.read_subject(home.log.name, subject, start_seq=start):
            record = codec.decode(msg.data, StoredAppend)
            session.apply(record, msg.seq, self.count)
            applied += 1
        return applied

    async def load(self, tenant: str, session_id: str, *, at_least: int = 0) -> Session:
        """The session, read from the stream where the cache is missing or behind."""
        key = (tenant, session_id)
        async with self._lock(key):
            session = self._cache.get(key)
            if session is None:
                session = Session()
                await self._read_tail(tenant, session_id, session)
            elif session.length < at_least:
                await self._read_tail(tenant, session_id, session)
            self._remember(key, session)
            return session

    async def _first_of(
        self, tenant: str, session_id: str, seq: int, msg_id: str
    ) -> tuple[Session, int, bool] | None:
        """After storing a session's first record at ``seq``: None if it is
        the subject's first message, as the conditional write promised. A
        leader change can lose that promise (the expected-last-sequence check
        is the leader's memory, nats-server#8469): a retried first write is
        then stored a second time, with its own incarnation nonce, and refs
        signed with it would name an incarnation no reader folds. The session
        as stored is then read again and returned, its first record's
        incarnation with it; duplicate when ``msg_id`` was already stored."""
        home = await self.regions.home(tenant)
        subject = home.log_subject(tenant, session_id)
        head = await self.bus.get_msg(home.log.name, 1, subject=subject)
        if head is None or head.seq == seq:
            return None
        session, dup = Session(), False
        async for msg in self.bus.read_subject(home.log.name, subject):
            record = codec.decode(msg.data, StoredAppend)
            dup = dup or (record.msg_id == msg_id and msg.seq < seq)
            session.apply(record, msg.seq, self.count)
        log.warning("context_first_write_raced", tenant=tenant, session=session_id,
                    first_seq=head.seq, seq=seq, duplicate=dup)  # fmt: skip
        return session, session.versions.get(msg_id, session.length), dup

    async def write(
        self, tenant: str, session_id: str, msg_id: str, build: Build
    ) -> tuple[Session, int, bool]:
        """Write the record ``build(session)`` makes, unless ``msg_id`` is
        already in the log. ``build`` may raise to refuse the write.

        Returns:
            (session, its length right after that record, duplicate)
        """
        key = (tenant, session_id)
        subject = (await self.regions.home(tenant)).log_subject(tenant, session_id)
        async with self._lock(key):
            # A session never seen here is written as if new, without reading
            # it first: the conditional write (expected last sequence 0) fails
            # if it has records, and then the tail is read below.
            session = self._cache.get(key) or Session()
            for _ in range(20):
                if msg_id in session.versions:
                    return session, session.versions[msg_id], True
                record = build(session)
                record.ts = time.time()
                if not session.exists:  # a new incarnation: old refs must not revive
                    record.incarnation = secrets.token_bytes(INCARNATION_BYTES)
                try:
                    seq = await self.bus.publish_if_last(
                        subject, codec.encode(record), session.last_seq
                    )
                except WrongLastSequence:
                    if await self._read_tail(tenant, session_id, session) == 0:
                        # Nothing newer, yet the sequence moved: purged underneath us.
                        session = Session()
                        await self._read_tail(tenant, session_id, session)
                        self._remember(key, session)
                    continue
                if not session.exists:
                    first = await self._first_of(tenant, session_id, seq, msg_id)
                    if first is not None:
                        self._remember(key, first[0])
                        return first
                session.apply(record, seq, self.count)
                self._remember(key, session)
                return session, session.length, False
        raise RuntimeError(f"write to {tenant}/{session_id} kept racing other writers")
