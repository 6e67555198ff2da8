"""Streams and their stored messages: reads and replays, conditional
writes, consumer look-ups, and erasure from the raw store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterable

import nats.js.errors
from nats.js import api

from proto.streams import ConsumerSpec

from .core import BusCore
from .delivery import HDR_EXPECTED_LAST_SUBJECT_SEQ
from .errors import NotFound, _gone, _translated
from .types import Callback, Consumer, Message, StreamState, Subscription, callback

# Up to this many messages on a subject are found one direct lookup each
# (a round trip apiece); more through an ephemeral consumer (see sequences()).
DIRECT_LOOKUPS = 16


class StreamReads(BusCore):
    """Streams and their messages (part of ``Bus``)."""

    async def read_subject(
        self,
        stream: str,
        subject: str,
        *,
        start_seq: int = 0,
        headers_only: bool = False,
        last_per_subject: bool = False,
    ) -> AsyncGenerator[Message, None]:
        """Every message stored on ``subject`` (from ``start_seq``; with
        ``last_per_subject`` the newest of each subject it matches), in order,
        through an ephemeral pull consumer that is deleted afterwards: left to
        its inactivity threshold, a burst of reads piles consumers up to the
        server's limit. Its pending count at creation is exact, so an empty
        read ends at once and a full one is never cut short."""
        if last_per_subject:
            policy = api.DeliverPolicy.LAST_PER_SUBJECT
        elif start_seq:
            policy = api.DeliverPolicy.BY_START_SEQUENCE
        else:
            policy = api.DeliverPolicy.ALL
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=policy,
            opt_start_seq=start_seq or None,
            headers_only=headers_only or None,
            inactive_threshold=10.0,
            mem_storage=True,
        )
        sub = await self._js.pull_subscribe(subject, stream=stream, config=config)
        name = None
        try:
            info = await sub.consumer_info()
            name, pending = info.name, info.num_pending or 0
            while pending > 0:
                batch = await sub.fetch(batch=min(pending, 256), timeout=2.0)
                for msg in batch:
                    yield Message._of(msg)
                pending = batch[-1].metadata.num_pending if batch else 0
        finally:
            await sub.unsubscribe()
            if name is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.delete_consumer(stream, name)

    async def stream_info(self, stream: str, *, subjects_filter: str | None = None) -> StreamState:
        """The stream's state (with ``subjects_filter``: the matching subjects
        and their message counts in ``subjects``)."""
        with _translated():
            info = await self._js.stream_info(stream, subjects_filter=subjects_filter)
        st = info.state
        placement = info.config.placement
        cluster = info.cluster
        servers: list[str] = []
        if cluster is not None:
            servers = [s for s in [cluster.leader, *(p.name for p in cluster.replicas or [])] if s]
        return StreamState(st.messages, st.bytes, st.first_seq, st.last_seq,
                           st.consumer_count, dict(st.subjects or {}),
                           tuple(placement.tags or ()) if placement else (),
                           tuple(dict.fromkeys(servers)))  # fmt: skip

    async def subjects(self, stream: str, pattern: str) -> dict[str, int]:
        """Subjects of ``stream`` matching ``pattern``, with their message counts.
        (The server pages past 100,000 subjects.)"""
        return (await self.stream_info(stream, subjects_filter=pattern)).subjects

    async def purge(self, stream: str, *, subject: str | None = None) -> None:
        """Remove every message (on ``subject``); a stream that is gone has none."""
        with contextlib.suppress(NotFound), _translated():
            await self._js.purge_stream(stream, subject=subject)

    async def get_msg(self, stream: str, seq: int, *, subject: str | None = None) -> Message | None:
        """The stored message ``seq``, or with ``subject`` the first message
        on it at or after ``seq`` (None: not there)."""
        with contextlib.suppress(NotFound), _translated():
            raw = await self._js.get_msg(stream, seq, subject=subject, next=subject is not None)
            return Message._stored(raw)
        return None

    async def last_msg(self, stream: str, subject: str) -> Message | None:
        """The newest message on ``subject`` (a direct get; None: none)."""
        with contextlib.suppress(NotFound), _translated():
            return Message._stored(await self._js.get_last_msg(stream, subject, direct=True))
        return None

    async def publish_if_last(
        self, subject: str, payload: bytes, last_seq: int, *, headers: dict[str, str] | None = None
    ) -> int:
        """Store ``payload`` only if ``subject``'s newest message is still
        ``last_seq`` (0: the subject is empty); returns its stream sequence.

        Raises:
            WrongLastSequence: the subject moved on (read it again).
        """
        hdrs = {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(last_seq), **(headers or {})}
        with _translated():
            ack = await self._js.publish(subject, payload, headers=hdrs)
        return int(ack.seq)

    async def ordered(
        self,
        subject: str,
        *,
        stream: str | None = None,
        start_seq: int = 0,
        cb: Callback | None = None,
        new: bool = False,
    ) -> Subscription:
        """An ordered consumer of ``subject`` from ``start_seq`` (0: the first
        message; ``new``: only messages stored from now on), to replay a stream
        and follow it live: with ``cb`` each message is handed to it, else
        read them with ``next_msg``."""
        policy = api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.NEW if new else policy,
            opt_start_seq=start_seq or None,
        )
        sub = await self._js.subscribe(
            subject, stream=stream, ordered_consumer=True, config=config, cb=callback(cb)
        )
        return Subscription(sub)

    # -- erasure from the raw store ------------------------------------------
    # A purge, a work queue's ack, or a bucket revision replaced under its history
    # limit only unlink a message: its bytes stay in the block file until the
    # server compacts the block (never, for the last one). STREAM.MSG.DELETE
    # without no_erase overwrites them. So erasure deletes message by message
    # and purges the subject afterwards, to catch anything written meanwhile.

    async def sequences(self, stream: str, subject: str, *, count: int | None = None) -> list[int]:
        """Stream sequences of every message on ``subject``. ``count``: how
        many it holds, when the caller knows (from ``subjects``): more than
        ``DIRECT_LOOKUPS`` are read through an ephemeral consumer (headers
        only, ``read_subject``); fewer, or an unknown count (the few messages
        a task or a key holds), one lookup each, which spares the consumer's
        create, info and delete round trips."""
        if count is not None and count > DIRECT_LOOKUPS:
            msgs = self.read_subject(stream, subject, headers_only=True)
            return [m.seq async for m in msgs]
        found: list[int] = []
        while msg := await self.get_msg(stream, found[-1] + 1 if found else 1, subject=subject):
            found.append(msg.seq)
        return found

    async def erase_messages(self, stream: str, seqs: Iterable[int]) -> int:
        """Overwrite and remove the messages ``seqs``; returns how many were there."""
        erased = 0
        for seq in seqs:
            try:
                await self._js.delete_msg(stream, seq)
                erased += 1
            except nats.js.errors.APIError as exc:
                if not _gone(exc):
                    raise
        return erased

    async def erase_subject(
        self, stream: str, subject: str, *, keep_after: int | None = None, count: int | None = None
    ) -> int:
        """Overwrite and remove every message on ``subject``, or with
        ``keep_after`` only those before that sequence (and no purge); returns
        how many were erased. ``count``: as for ``sequences``."""
        seqs = await self.sequences(stream, subject, count=count)
        if keep_after is not None:
            return await self.erase_messages(stream, [s for s in seqs if s < keep_after])
        erased = await self.erase_messages(stream, seqs)
        await self.purge(stream, subject=subject)
        return erased

    async def consumers(self, stream: str) -> list[Consumer]:
        """Every consumer of ``stream``, with its configuration."""
        infos = await self._js.consumers_info(stream)
        return [
            Consumer(i.name, i.config.description or "", i.config.filter_subject or "",
                     i.config.ack_wait or 0.0, i.config.max_deliver or 0)
            for i in infos
        ]  # fmt: skip

    async def delete_consumer(self, spec: ConsumerSpec) -> None:
        await self._js.delete_consumer(spec.stream, spec.durable)

    async def pending(self, spec: ConsumerSpec) -> int:
        """Messages waiting for, or held by, the consumer (the scaling signal)."""
        info = await self._js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def waiting(self, spec: ConsumerSpec) -> int:
        """Messages not yet delivered to the consumer."""
        info = await self._js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0)
