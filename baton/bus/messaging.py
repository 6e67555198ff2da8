"""Sending: JetStream publish, core notify, request-reply (client and
server side), and core subscriptions: typed (``subscribe``: decoded once
here) or raw (``subscribe_raw``: JSON advisories, tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from nats.aio.msg import Msg

from baton import tracing
from baton.metrics import UNDECODABLE, register
from proto import codec

from .delivery import HDR_TASK_ID, Request, Responder, _headers
from .streams import StreamReads
from .types import Callback, Published, Subscription, callback

T = TypeVar("T")
R = TypeVar("R")
# A typed subscription's handler: the decoded body and the subject it came on.
Listener = Callable[[T, str], Awaitable[None]]


class Messaging(StreamReads):
    """Publish, notify, request, serve, subscribe (part of ``Bus``)."""

    async def publish(
        self,
        subject: str,
        body: Any,
        *,
        msg_id: str | None = None,
        task_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published:
        """JetStream publish of a Struct (or bytes); ``duplicate`` is true
        when ``msg_id`` was already stored."""
        payload = body if isinstance(body, bytes) else codec.encode(body)
        ack = await self._js.publish(subject, payload, headers=_headers(msg_id, task_id, headers))
        return Published(ack.stream, ack.seq, bool(ack.duplicate))

    async def publish_for(
        self, subject: str, body: Any, *, reply: str, msg_id: str, task_id: str | None = None
    ) -> None:
        """JetStream publish whose ack goes to ``reply``, a request's asker,
        not to this service: a request answered by storing a message (the
        context store's ``answer``: the worker learns from JetStream itself
        that its result is stored). Not awaited: the asker's timeout covers
        a publish lost on the way."""
        payload = body if isinstance(body, bytes) else codec.encode(body)
        await self._nc.publish(subject, payload, reply=reply,
                               headers=_headers(msg_id, task_id, None))  # fmt: skip

    async def subscribe(
        self, subject: str, type_: type[T], handler: Listener[T], *, queue: str = ""
    ) -> Subscription:
        """A core NATS subscription of ``type_`` messages (heartbeats, cancels,
        invalidations). Each is decoded once, here; one that is not a
        ``type_`` is counted (``baton_undecodable_messages_total``, by
        ``subject`` as subscribed) and dropped: a broadcast has no sender to
        answer. ``handler(body, subject)`` runs in the message's trace context,
        with its task id (when it names one) and trace id bound in the log
        context."""
        register(UNDECODABLE)
        undecodable = UNDECODABLE.labels(subject)  # the series exists from the start

        async def on_msg(msg: Msg) -> None:
            try:
                body = codec.decode(msg.data, type_)
            except codec.DecodeError:
                undecodable.inc()
                return
            headers = msg.headers or {}
            task_id = headers.get(HDR_TASK_ID)
            bound = {"task_id": task_id} if task_id else {}
            with (
                tracing.continued(headers),
                structlog.contextvars.bound_contextvars(**bound),
            ):
                await handler(body, msg.subject)

        return Subscription(await self._nc.subscribe(subject, queue=queue, cb=on_msg))

    async def subscribe_raw(self, subject: str, cb: Callback, *, queue: str = "") -> Subscription:
        """A core NATS subscription handed each ``Message`` undecoded (bodies
        that are not Baton's types, such as JetStream's JSON advisories)."""
        return Subscription(await self._nc.subscribe(subject, queue=queue, cb=callback(cb)))

    async def serve(
        self,
        subjects_: Sequence[str],
        responder: Responder,
        *,
        queue: str = "",
        concurrency: int = 64,
    ) -> None:
        """Answer requests on ``subjects_`` (in queue group ``queue``), at most
        ``concurrency`` at once across them all: a full house leaves further
        requests in the client's buffer. Each runs in its caller's trace
        context, with its task id and trace id bound in the log context; the
        reply is sent if the request asked for one."""
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        async def answer(msg: Msg) -> None:
            request = Request(msg.subject, msg.data, msg.headers or {}, msg.reply or "")
            try:
                with (
                    tracing.continued(request.headers),
                    structlog.contextvars.bound_contextvars(task_id=request.task_id),
                ):
                    reply = await responder(request)
                    if reply is not None and msg.reply:
                        await msg.respond(
                            reply if isinstance(reply, bytes) else codec.encode(reply)
                        )
            finally:
                slots.release()

        async def on_msg(msg: Msg) -> None:
            await slots.acquire()
            task = asyncio.create_task(answer(msg))
            running.add(task)
            task.add_done_callback(running.discard)

        for subject in subjects_:
            await self._nc.subscribe(subject, queue=queue, cb=on_msg)

    async def notify(self, subject: str, body: Any, *, task_id: str | None = None) -> None:
        """Core NATS publish (heartbeats, cancellations): fire and forget."""
        payload = body if isinstance(body, bytes) else codec.encode(body)
        await self._nc.publish(subject, payload, headers=_headers(None, task_id, None))

    async def request(
        self,
        subject: str,
        body: Any,
        reply_type: type[R],
        *,
        timeout: float = 5.0,
        task_id: str | None = None,
    ) -> R:
        """Core request-reply with typed decoding of the reply."""
        msg = await self._nc.request(
            subject, codec.encode(body), timeout=timeout, headers=_headers(None, task_id, None)
        )
        return codec.decode(msg.data, reply_type)

    async def request_raw(
        self, subject: str, payload: bytes, *, timeout: float = 5.0, task_id: str | None = None
    ) -> bytes:
        """Core request-reply with bytes both ways (NATS's own JSON APIs,
        e.g. ``$SYS.REQ.CLAIMS.UPDATE``; a reply that may be one of two
        kinds, the context store's ``answer``)."""
        headers = _headers(None, task_id, None) if task_id else None
        msg = await self._nc.request(subject, payload, timeout=timeout, headers=headers)
        return bytes(msg.data)

    async def gather_raw(
        self, subject: str, payload: bytes = b"", *, wait: float = 1.0
    ) -> list[bytes]:
        """Core request answered by many (``$SYS.REQ.SERVER.PING``: every
        server): every reply that arrives within ``wait`` seconds."""
        replies: list[bytes] = []
        inbox = self._nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            replies.append(bytes(msg.data))

        sub = await self._nc.subscribe(inbox, cb=on_msg)
        try:
            await self._nc.publish(subject, payload, reply=inbox)
            await asyncio.sleep(wait)
        finally:
            await sub.unsubscribe()
        return replies
