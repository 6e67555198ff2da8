"""The one NATS transport every Baton service uses.

* ``connect`` — connect with reconnect, or raise ``BusUnavailable`` clearly.
* ``Bus.provision`` — create/update streams, consumers and KV buckets
  idempotently (retrying JetStream's transient "error creating store").
* ``Bus.publish`` — JetStream publish with ``Nats-Msg-Id``, ``Baton-Task-Id``
  and the current trace context (W3C ``traceparent``/``tracestate``, through
  OpenTelemetry's propagator: ``baton.tracing``); every handler (``consume``,
  ``serve``) runs in the trace context of the message it handles.
* ``Bus.consume`` — a pull loop that fetches in batches with a short timeout,
  runs handlers concurrently, keeps long handlers alive with ``in_progress``,
  and turns each handler's outcome into ack / nak-with-delay / term.
* ``Bus.request`` / ``subscribe`` / ``notify`` — core NATS, typed replies.
* ``Bus.ordered`` / ``read_subject`` — replay a stream (and follow it live);
  ``stream_info``, ``subjects``, ``get_msg``, ``last_msg``, ``publish_if_last``,
  ``purge``; ``erase_messages`` / ``erase_subject`` overwrite the raw store.
* ``Bucket`` (from ``Bus.ensure_bucket``) — KV reads, compare-and-set writes,
  watches, erasure of replaced revisions.
* ``Bus.account(prefix)`` — the same helpers on another account's JetStream.

Nothing outside this module talks to nats-py: its errors that callers act on
arrive as ``NotFound``, ``WrongLastSequence``, ``BusClosed`` (or the
``TRANSIENT`` tuple, for retrying an idempotent operation), messages as ``Msg``.

Handler outcomes are explicit::

    return normally   -> ack
    raise Nak(delay)  -> nak, redelivered after ``delay`` seconds
    raise Term(why)   -> term (poison: never redelivered), dead-lettered
    any other error   -> nak with back-off; on the last delivery, term + dead letter
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from baton import jwt, tracing
from baton.accounts import SERVICES, inbox_prefix
from baton.metrics import DEAD_LETTERS, MESSAGES_HANDLED, PERMISSION_VIOLATIONS, register
from baton.urls import redact, split_creds
from proto import codec, keys, subjects
from proto.streams import BucketSpec, ConsumerSpec, StreamSpec

log = structlog.get_logger("baton.transport")

HDR_MSG_ID = "Nats-Msg-Id"
HDR_TASK_ID = "Baton-Task-Id"
HDR_TRACEPARENT = tracing.HDR_TRACEPARENT
HDR_DLQ_REASON = "Baton-Dead-Letter-Reason"
HDR_DLQ_SUBJECT = "Baton-Original-Subject"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"

PING_INTERVAL = 5  # seconds; see connect()
_STORE_RACE_ERR = 10049  # "error creating store for stream": transient, retry
_STORE_RACE_ATTEMPTS = 8
_STREAM_EXISTS_ERR = 10058  # "stream name already in use with a different configuration"
# "no suitable peers for placement": a cluster peer is still starting (or
# restarting); it comes back, so provisioning waits for it like an election.
_NO_PEERS_ERR = 10005
# Up to this many messages on a subject are found one direct lookup each
# (a round trip apiece); more through an ephemeral consumer (see sequences()).
DIRECT_LOOKUPS = 16


class TransportError(Exception):
    """Base class of transport failures."""


class BusUnavailable(TransportError):
    """NATS could not be reached."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        super().__init__(f"cannot reach NATS at {url}: {cause or 'no server answered'}")
        self.url = url


class BusClosed(TransportError):
    """The connection was closed (the service is stopping)."""


class NotFound(TransportError):
    """No such message, key, stream or consumer."""


class WrongLastSequence(TransportError):
    """A conditional write lost: the subject or key moved on since the
    sequence or revision it named (read again and retry)."""


# JetStream briefly without a leader, or NATS reconnecting: an idempotent
# operation may be tried again. nats-py's own classes, named once here.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

_WRONG_LAST_SEQ = 10071  # JetStream: "wrong last sequence"
_SEQUENCE_NOT_FOUND = 10043
_DELETE_FAILED = 10057


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """nats-py's not-found and lost-conditional-write errors as Baton's."""
    try:
        yield
    except (nats.js.errors.NotFoundError, nats.js.errors.KeyNotFoundError) as exc:
        raise NotFound(str(exc)) from exc
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise WrongLastSequence(str(exc)) from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code == _WRONG_LAST_SEQ:
            raise WrongLastSequence(str(exc)) from exc
        raise


def _gone(exc: nats.js.errors.APIError) -> bool:
    """The message is not there (erased meanwhile by another replica, or
    acked). A delete says so three ways: a 404, a 400 'sequence N not found'
    (10043), or a 500 'no message found' (10057, which also means 'not
    permitted': that one still raises)."""
    if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _SEQUENCE_NOT_FOUND:
        return True
    return exc.err_code == _DELETE_FAILED and "no message found" in (exc.description or "")


class Outcome(Exception):
    """Base of the outcomes a handler raises to settle its delivery."""


class Nak(Outcome):
    """Handler outcome: redeliver after ``delay`` seconds."""

    def __init__(self, delay: float = 1.0, reason: str = "") -> None:
        super().__init__(reason or f"nak({delay})")
        self.delay = delay
        self.reason = reason


class Term(Outcome):
    """Handler outcome: never redeliver this message. ``dead_letter`` keeps a
    copy on ``baton.dlq.<consumer>`` (poison); rejected client input that was
    already answered with a ``failed`` event sets it False."""

    def __init__(self, reason: str, *, dead_letter: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dead_letter = dead_letter


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with a delivery once its handler is done."""

    action: Literal["ack", "nak", "term", "dead_letter"]
    delay: float = 0.0  # nak: redeliver after this many seconds
    reason: str = ""  # dead_letter: why


def settlement(error: BaseException | None, num_delivered: int, max_deliver: int) -> Settlement:
    """The one rule that turns a handler's outcome into ack / nak / term.

    Returned normally -> ack; ``Nak(delay)`` -> nak, but dead-lettered on the
    last delivery; ``Term`` -> term (dead-lettered unless it says not to); a
    ``codec.DecodeError`` (a body no delivery can read) -> dead-lettered at once; any
    other error -> nak with exponential back-off (0.5 s doubling, at most
    30 s), dead-lettered on the last delivery. ``max_deliver <= 0``: no last
    delivery."""
    last = 0 < max_deliver <= num_delivered
    if error is None:
        return Settlement("ack")
    if isinstance(error, codec.DecodeError):  # poison: no delivery will read it
        return Settlement("dead_letter", reason=f"undecodable: {error}")
    if isinstance(error, Nak):
        if last:
            return Settlement("dead_letter", reason=f"nak on last delivery: {error.reason}")
        return Settlement("nak", delay=error.delay)
    if isinstance(error, Term):
        return Settlement("dead_letter" if error.dead_letter else "term", reason=error.reason)
    if last:
        return Settlement("dead_letter", reason=f"{type(error).__name__}: {error}")
    return Settlement("nak", delay=min(30.0, 0.5 * 2 ** (num_delivered - 1)))


def _headers(
    msg_id: str | None, task_id: str | None, extra: dict[str, str] | None
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if msg_id:
        headers[HDR_MSG_ID] = msg_id
    if task_id:
        headers[HDR_TASK_ID] = task_id
    tracing.inject(headers)
    if extra:
        headers.update(extra)
    return headers


class Delivery:
    """One JetStream message handed to a handler."""

    __slots__ = ("_settled", "msg")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self._settled = False

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def headers(self) -> dict[str, str]:
        return self.msg.headers or {}

    @property
    def msg_id(self) -> str | None:
        return self.headers.get(HDR_MSG_ID)

    @property
    def task_id(self) -> str | None:
        return self.headers.get(HDR_TASK_ID)

    @property
    def num_delivered(self) -> int:
        return self.msg.metadata.num_delivered or 1

    @property
    def stream_seq(self) -> int:
        return self.msg.metadata.sequence.stream

    @property
    def published_at(self) -> float:
        """When the message entered the stream (epoch seconds)."""
        ts = self.msg.metadata.timestamp
        return ts.timestamp() if ts is not None else time.time()

    def decode(self, type_: type[Any]) -> Any:
        return codec.decode(self.data, type_)

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self.msg.ack()

    async def ack_sync(self) -> None:
        """Ack and wait for the server to confirm it (before, say, deleting
        the consumer, which would drop an ack still in flight)."""
        if not self._settled:
            self._settled = True
            await self.msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        if not self._settled:
            self._settled = True
            await self.msg.nak(delay=delay)

    async def term(self) -> None:
        if not self._settled:
            self._settled = True
            await self.msg.term()

    async def in_progress(self) -> None:
        if not self._settled:
            await self.msg.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]


class _KeepAlive:
    """Sends ``in_progress`` for a delivery every ``every`` seconds while its
    handler runs. A timer handle, not a task: nearly every handler ends long
    before the first beat, and a task per delivery (created, then cancelled)
    was a measurable share of each service's CPU."""

    __slots__ = ("_delivery", "_every", "_handle", "_loop")
    _beating: set[asyncio.Task[None]] = set()  # strong refs to beats in flight

    def __init__(self, delivery: Delivery, every: float) -> None:
        self._delivery = delivery
        self._every = every
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(every, self._beat)

    def _beat(self) -> None:
        self._handle = self._loop.call_later(self._every, self._beat)
        task = self._loop.create_task(self._send())
        self._beating.add(task)
        task.add_done_callback(self._beating.discard)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._delivery.in_progress()

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(frozen=True, slots=True)
class Request:
    """One core NATS request handed to a ``serve`` handler."""

    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def task_id(self) -> str | None:
        return self.headers.get(HDR_TASK_ID)


class Gate(Protocol):
    """Admission in front of a pull loop (``Bus.consume``): how many more
    deliveries it may take now, and a wait for that to change."""

    def room(self) -> int: ...

    async def wait(self) -> None:
        """Return when the room may have grown (or after a short while)."""

    def took(self, delivery: Delivery) -> None:
        """``delivery`` was taken, before its handler runs."""


# A request endpoint: the reply (a Struct, or bytes), or None to leave the
# request unanswered (the caller's timeout then retries it).
Responder = Callable[[Request], Awaitable[Any]]


@dataclass
class Puller:
    """A bound pull subscription: ``fetch`` up to ``n`` messages."""

    spec: ConsumerSpec
    sub: JetStreamContext.PullSubscription

    async def fetch(self, n: int, timeout: float) -> list[Delivery]:
        """Up to ``n`` messages, waiting at most ``timeout`` for the first.
        A transient failure (NATS restarting) is logged and yields nothing;
        a closed connection raises ``BusClosed``.

        Long waits should ask for one message: a batch fetch that meets the
        late 408 of an expired earlier pull request re-issues its request, and
        a message delivered to that request then sits until the whole batch
        timeout ends (measured: p99 step latency 770 ms instead of ms)."""
        try:
            msgs = await self.sub.fetch(batch=max(1, n), timeout=timeout)
        except TimeoutError:  # nats-py raises both its own and asyncio's
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError) as exc:
            raise BusClosed(str(exc)) from exc
        except Exception as exc:
            log.warning("fetch_failed", consumer=self.spec.durable, error=repr(exc))
            await asyncio.sleep(0.5)
            return []
        return [Delivery(m) for m in msgs]

    async def close(self) -> None:
        """Stop listening (the consumer itself stays)."""
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()


def _stream_config(spec: StreamSpec, replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=api.RetentionPolicy.WORK_QUEUE
        if spec.retention == "workqueue"
        else api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        duplicate_window=spec.duplicate_window,
        max_age=spec.max_age or None,
        max_msg_size=spec.max_msg_size,
        num_replicas=replicas,
        allow_direct=True,
        description=spec.description or None,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_delete,
    )


def _bucket_config(spec: BucketSpec, replicas: int) -> api.StreamConfig:
    """The stream of an erasable KV bucket: nats-py's own KV settings except
    that messages may be deleted (which ``create_key_value`` forbids, and a
    stream can never be changed to allow later)."""
    return api.StreamConfig(
        name=spec.stream,
        description=spec.description or None,
        subjects=[spec.subject()],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=False,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, spec.ttl) if spec.ttl else 120.0,
        max_age=spec.ttl or None,
        max_msgs_per_subject=spec.history,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


def _consumer_config(spec: ConsumerSpec) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        description=spec.description or None,
    )


# JetStream briefly without a meta leader (a node restarting, an election):
# provisioning waits for it (TRANSIENT) instead of failing the service's start.
PROVISION_PATIENCE = 60.0  # seconds


async def _retry_store_race(op: Callable[[], Awaitable[Any]]) -> Any:
    """Run the provisioning step ``op`` (the whole step: a create and the
    update or lookup that follows it), again while JetStream is briefly
    unavailable or its store races."""
    deadline = time.monotonic() + PROVISION_PATIENCE
    attempt = 0
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("jetstream_unavailable_retrying", error=type(exc).__name__)
            await asyncio.sleep(0.5)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NO_PEERS_ERR and time.monotonic() <= deadline:
                log.warning("jetstream_peers_offline_retrying", error=exc.description)
                await asyncio.sleep(0.5)
                continue
            attempt += 1
            if exc.err_code != _STORE_RACE_ERR or attempt >= _STORE_RACE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5)


class Bus:
    """A connected NATS client plus JetStream, shared by one service process."""

    def __init__(self, nc: NATS, *, replicas: int = 1, js: JetStreamContext | None = None) -> None:
        self.nc = nc
        self.js = js or nc.jetstream()
        self.replicas = replicas
        self._stopping = asyncio.Event()

    # -- provisioning ------------------------------------------------------

    async def reaches_account(self, api_prefix: str, timeout: float = 2.0) -> bool:
        """True when another account's JetStream answers under ``api_prefix``
        (one try: a NATS without that import has nothing to wait for)."""
        try:
            await self.account(api_prefix, timeout=timeout).js.account_info()
        except TRANSIENT:
            return False
        return True

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create or update the stream (in another account: ``account(prefix).ensure_stream``)."""
        config = _stream_config(spec, self.replicas)

        async def add_or_update() -> None:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS_ERR:
                    raise
                await self.js.update_stream(config)

        await _retry_store_race(add_or_update)

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the durable consumer, or update its mutable fields in place
        (the server keeps its position and pending messages)."""
        config = _consumer_config(spec)
        await _retry_store_race(lambda: self.js.add_consumer(spec.stream, config))

    async def ensure_bucket(self, spec: BucketSpec) -> Bucket:
        """Create the KV bucket if missing; ``spec.erasable``: with deletes
        allowed on its stream, so replaced revisions can be erased."""
        if spec.erasable:
            kv, erasable = await self._ensure_erasable_bucket(spec)
            return Bucket(self, kv, spec, erasable=erasable)
        plain: KeyValue = await _retry_store_race(
            lambda: self.js.create_key_value(
                bucket=spec.name,
                history=spec.history,
                ttl=spec.ttl or None,
                replicas=self.replicas,
                direct=True,
                description=spec.description or None,
            )
        )
        return Bucket(self, plain, spec, erasable=False)

    async def _ensure_erasable_bucket(self, spec: BucketSpec) -> tuple[KeyValue, bool]:
        """The bucket's KV, and whether its stream allows deletes."""
        config = _bucket_config(spec, self.replicas)

        async def ensure() -> tuple[KeyValue, bool]:
            erasable = True
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS_ERR:
                    raise
                info = await self.js.stream_info(spec.stream)
                if info.config.deny_delete:
                    # Created before erasure support: deletes can never be allowed
                    # on it. It keeps working; erasure falls back to KV purges.
                    log.warning("bucket_not_erasable", bucket=spec.name)
                    erasable = False
                else:
                    await self.js.update_stream(config)
            kv: KeyValue = await self.js.key_value(spec.name)
            return kv, erasable

        result: tuple[KeyValue, bool] = await _retry_store_race(ensure)
        return result

    async def provision(
        self,
        streams: Sequence[StreamSpec] = (),
        consumers: Sequence[ConsumerSpec] = (),
    ) -> None:
        """Create or update streams and consumers; safe to call from every replica."""
        for s in streams:
            await self.ensure_stream(s)
        for c in consumers:
            await self.ensure_consumer(c)

    # -- publishing --------------------------------------------------------

    async def publish(
        self,
        subject: str,
        body: Any,
        *,
        msg_id: str | None = None,
        task_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> api.PubAck:
        """JetStream publish of a Struct (or bytes); returns the PubAck
        (``duplicate`` is true when ``msg_id`` was already stored)."""
        payload = body if isinstance(body, bytes) else codec.encode(body)
        return await self.js.publish(subject, payload, headers=_headers(msg_id, task_id, headers))

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Any:
        """A core NATS subscription (heartbeats, cancels, request endpoints)."""
        return await self.nc.subscribe(subject, queue=queue, cb=cb)

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
            request = Request(msg.subject, msg.data, msg.headers or {})
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
            await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def notify(self, subject: str, body: Any, *, task_id: str | None = None) -> None:
        """Core NATS publish (heartbeats, cancellations): fire and forget."""
        payload = body if isinstance(body, bytes) else codec.encode(body)
        await self.nc.publish(subject, payload, headers=_headers(None, task_id, None))

    async def request(
        self,
        subject: str,
        body: Any,
        reply_type: type[Any],
        *,
        timeout: float = 5.0,
        task_id: str | None = None,
    ) -> Any:
        """Core request-reply with typed decoding of the reply."""
        msg = await self.nc.request(
            subject, codec.encode(body), timeout=timeout, headers=_headers(None, task_id, None)
        )
        return codec.decode(msg.data, reply_type)

    async def refresh_credentials(self, timeout: float = 10.0) -> None:
        """Reconnect now, presenting the ``.creds`` file as it is now (a
        re-issued user JWT with other permissions); back when connected.

        Raises:
            BusUnavailable: not connected again within ``timeout`` seconds.
        """
        await self.nc.force_reconnect()
        deadline = time.monotonic() + timeout
        await asyncio.sleep(0.01)
        while not self.nc.is_connected:
            if time.monotonic() > deadline:
                raise BusUnavailable("the server", TimeoutError("no reconnect"))
            await asyncio.sleep(0.05)

    async def request_raw(self, subject: str, payload: bytes, *, timeout: float = 5.0) -> bytes:
        """Core request-reply with bytes both ways (NATS's own JSON APIs,
        e.g. ``$SYS.REQ.CLAIMS.UPDATE``)."""
        msg = await self.nc.request(subject, payload, timeout=timeout)
        return bytes(msg.data)

    # -- consuming ---------------------------------------------------------

    async def puller(self, spec: ConsumerSpec) -> Puller:
        # Series exist from the start, so the first dead letter is an increase.
        register(DEAD_LETTERS, MESSAGES_HANDLED)
        DEAD_LETTERS.labels(spec.durable)
        for outcome in ("ack", "nak", "term"):
            MESSAGES_HANDLED.labels(spec.durable, outcome)
        sub = await self.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        return Puller(spec=spec, sub=sub)

    async def settle(self, spec: ConsumerSpec, delivery: Delivery, handler: Handler) -> None:
        """Run ``handler`` on one delivery and settle it by outcome."""
        with tracing.continued(delivery.headers):
            bound = {"consumer": spec.durable}
            if delivery.task_id:
                bound["task_id"] = delivery.task_id
            with structlog.contextvars.bound_contextvars(**bound):
                await self._settle(spec, delivery, handler)

    async def erase(self, delivery: Delivery) -> None:
        """Overwrite ``delivery``'s message in the store (``STREAM.MSG.DELETE``
        with erase) before it is acked: a work queue's ack only unlinks it.
        Best effort: a failure is logged and the message is settled anyway."""
        try:
            await self.erase_messages(delivery.msg.metadata.stream, [delivery.stream_seq])
        except Exception as exc:
            log.warning("erase_handled_failed", error=repr(exc))

    async def _settle(self, spec: ConsumerSpec, delivery: Delivery, handler: Handler) -> None:
        keepalive = _KeepAlive(delivery, spec.ack_wait / 3)
        error: BaseException | None = None
        try:
            await handler(delivery)
        except asyncio.CancelledError:
            keepalive.cancel()
            MESSAGES_HANDLED.labels(spec.durable, "nak").inc()
            with contextlib.suppress(Exception):
                await asyncio.shield(delivery.nak(0.5))
            raise
        except Exception as exc:
            error = exc
        keepalive.cancel()
        s = settlement(error, delivery.num_delivered, spec.max_deliver)
        if error is not None and not isinstance(error, Outcome):
            if s.action == "dead_letter":
                log.error("handler_failed_last_delivery", error=repr(error))
            else:
                log.warning("handler_failed", error=repr(error), retry_in=s.delay)
        try:
            if s.action in ("ack", "term") and spec.erase_handled:
                await self.erase(delivery)  # dead letters erase their own
            if s.action == "ack":
                await delivery.ack()
            elif s.action == "nak":
                await delivery.nak(s.delay)
            elif s.action == "term":
                await delivery.term()
            else:
                await self.dead_letter(spec, delivery, s.reason)
        finally:
            MESSAGES_HANDLED.labels(spec.durable, "nak" if s.action == "nak" else
                                    "ack" if s.action == "ack" else "term").inc()  # fmt: skip

    async def dead_letter(self, spec: ConsumerSpec, delivery: Delivery, reason: str) -> None:
        """Terminate ``delivery`` and keep a copy on ``baton.dlq.<consumer>``."""
        DEAD_LETTERS.labels(spec.durable).inc()
        log.warning("dead_lettered", reason=reason, subject=delivery.subject)
        if spec.erase_handled:
            await self.erase(delivery)
        await delivery.term()
        try:
            await self.publish(
                subjects.dead_letter(spec.durable),
                delivery.data,
                msg_id=keys.dead_letter(spec.durable, delivery.stream_seq),
                task_id=delivery.task_id,
                headers={HDR_DLQ_REASON: reason[:200], HDR_DLQ_SUBJECT: delivery.subject},
            )
        except Exception as exc:  # the DLQ copy is best effort; the term stands
            log.warning("dead_letter_copy_failed", error=repr(exc))

    async def consume(
        self,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        concurrency: int = 64,
        gate: Gate | None = None,
        running: set[asyncio.Task[None]] | None = None,
        until: Callable[[], bool] | None = None,
        finish: bool = True,
        fetch_timeout: float = 0.05,
        idle_timeout: float = 1.0,
    ) -> None:
        """Pull and handle messages until ``stop()`` (or ``until()``, asked
        when a fetch comes back empty); at most ``concurrency`` handlers run at
        once, and no more are taken than ``gate.room()`` allows (a shut gate is
        waited on). ``running``: the handler tasks, in a set the caller may
        share between loops. ``finish``: in-flight handlers finish before it
        returns (False: the caller drains them)."""
        puller = await self.puller(spec)
        running = set() if running is None else running
        while not self._stopping.is_set():
            room = concurrency - len(running)
            if room <= 0:  # every slot taken: wait for a handler to end
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if gate is not None:
                room = min(room, gate.room())
                if room <= 0:  # slots free, the gate shut
                    await gate.wait()
                    continue
            try:
                # Busy: batches with short waits, so finished slots refill
                # quickly. Idle: one message with a long wait (see Puller.fetch).
                if running:
                    batch = await puller.fetch(room, fetch_timeout)
                else:
                    batch = await puller.fetch(1, idle_timeout)
            except BusClosed:
                break
            if not batch and until is not None and until():
                break
            for d in batch:
                if gate is not None:
                    gate.took(d)
                task = asyncio.create_task(self.settle(spec, d, handler))
                running.add(task)
                task.add_done_callback(running.discard)
        if finish and running:
            await asyncio.gather(*running, return_exceptions=True)

    def stop(self) -> None:
        """Ask every ``consume`` loop to stop pulling."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` was called."""
        await self._stopping.wait()

    async def read_subject(
        self, stream: str, subject: str, *, start_seq: int = 0, headers_only: bool = False
    ) -> AsyncIterator[Msg]:
        """Every message stored on ``subject`` (from ``start_seq``), in order,
        through an ephemeral consumer that is deleted afterwards: left to its
        inactivity threshold, a burst of reads piles consumers up to the
        server's limit."""
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
            if start_seq
            else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq or None,
            headers_only=headers_only or None,
            inactive_threshold=10.0,
            mem_storage=True,
        )
        sub = await self.js.pull_subscribe(subject, stream=stream, config=config)
        name = None
        try:
            info = await sub.consumer_info()
            name, pending = info.name, info.num_pending or 0
            while pending > 0:
                batch = await sub.fetch(batch=min(pending, 256), timeout=2.0)
                for msg in batch:
                    yield msg
                pending = batch[-1].metadata.num_pending if batch else 0
        finally:
            await sub.unsubscribe()
            if name is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.delete_consumer(stream, name)

    # -- streams and their messages -----------------------------------------

    def account(self, api_prefix: str, *, timeout: float = 5.0) -> Bus:
        """This connection speaking to another account's JetStream, whose API
        this account imports under ``api_prefix`` (a tenant's copy of its
        events): provisioning and the stream and erase helpers work there too."""
        js = self.nc.jetstream(prefix=api_prefix, timeout=timeout)
        return Bus(self.nc, replicas=self.replicas, js=js)

    async def stream_info(
        self, stream: str, *, subjects_filter: str | None = None
    ) -> api.StreamInfo:
        """The stream's configuration and state (with ``subjects_filter``: the
        matching subjects and their message counts in ``state.subjects``)."""
        with _translated():
            info: api.StreamInfo = await self.js.stream_info(
                stream, subjects_filter=subjects_filter
            )
        return info

    async def subjects(self, stream: str, pattern: str) -> dict[str, int]:
        """Subjects of ``stream`` matching ``pattern``, with their message counts.
        (The server pages past 100,000 subjects.)"""
        info = await self.stream_info(stream, subjects_filter=pattern)
        return dict(info.state.subjects or {})

    async def purge(self, stream: str, *, subject: str | None = None) -> None:
        """Remove every message (on ``subject``); a stream that is gone has none."""
        with contextlib.suppress(NotFound), _translated():
            await self.js.purge_stream(stream, subject=subject)

    async def get_msg(self, stream: str, seq: int) -> api.RawStreamMsg | None:
        """The stored message ``seq`` (None: not there)."""
        with contextlib.suppress(NotFound), _translated():
            msg: api.RawStreamMsg = await self.js.get_msg(stream, seq)
            return msg
        return None

    async def last_msg(self, stream: str, subject: str) -> api.RawStreamMsg | None:
        """The newest message on ``subject`` (a direct get; None: none)."""
        with contextlib.suppress(NotFound), _translated():
            msg: api.RawStreamMsg = await self.js.get_last_msg(stream, subject, direct=True)
            return msg
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
            ack = await self.js.publish(subject, payload, headers=hdrs)
        return int(ack.seq)

    async def ordered(
        self,
        subject: str,
        *,
        stream: str | None = None,
        start_seq: int = 0,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        new: bool = False,
    ) -> JetStreamContext.PushSubscription:
        """An ordered consumer of ``subject`` from ``start_seq`` (0: the first
        message; ``new``: only messages stored from now on), to replay a stream
        and follow it live: with ``cb`` each message is handed to it, else
        read them with ``next_msg``."""
        policy = api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.NEW if new else policy,
            opt_start_seq=start_seq or None,
        )
        sub: JetStreamContext.PushSubscription = await self.js.subscribe(
            subject, stream=stream, ordered_consumer=True, config=config, cb=cb
        )
        return sub

    async def flush(self, timeout: int = 2) -> None:
        """Wait until the server has seen everything sent so far (subscriptions
        included)."""
        await self.nc.flush(timeout=timeout)

    # -- erasure from the raw store ------------------------------------------
    # A purge, a work queue's ack, or a KV revision replaced under its history
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
            return [m.metadata.sequence.stream async for m in msgs]
        found: list[int] = []
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return found
            assert msg.seq is not None
            found.append(msg.seq)
            seq = msg.seq + 1

    async def erase_messages(self, stream: str, seqs: Iterable[int]) -> int:
        """Overwrite and remove the messages ``seqs``; returns how many were there."""
        erased = 0
        for seq in seqs:
            try:
                await self.js.delete_msg(stream, seq)
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

    async def consumers(self, stream: str) -> list[api.ConsumerInfo]:
        """Every consumer of ``stream``, with its configuration."""
        infos: list[api.ConsumerInfo] = await self.js.consumers_info(stream)
        return infos

    async def delete_consumer(self, spec: ConsumerSpec) -> None:
        await self.js.delete_consumer(spec.stream, spec.durable)

    async def pending(self, spec: ConsumerSpec) -> int:
        """Messages waiting for, or held by, the consumer (the scaling signal)."""
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def waiting(self, spec: ConsumerSpec) -> int:
        """Messages not yet delivered to the consumer."""
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0)

    async def close(self) -> None:
        """Flush what was published and close. (Not ``drain``: nats-py waits
        out its whole drain timeout on a bound pull subscription.)"""
        self.stop()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()


@dataclass(frozen=True, slots=True)
class Entry:
    """One KV entry as stored: ``deleted`` for a delete or purge marker."""

    key: str
    value: bytes
    revision: int
    deleted: bool = False


class Bucket:
    """A KV bucket through the transport: reads, compare-and-set writes,
    watches, and (``erasable``) erasure of replaced revisions from the raw store."""

    def __init__(self, bus: Bus, kv: KeyValue, spec: BucketSpec, *, erasable: bool) -> None:
        self._bus = bus
        self._kv = kv
        # Direct gets (the bucket allows them) are answered by any replica,
        # and a follower may not have the newest revision yet; ``consistent``
        # reads ask the stream's leader.
        self._leader = KeyValue(name=kv._name, stream=kv._stream, pre=kv._pre, js=kv._js,
                                direct=False)  # fmt: skip
        self.spec = spec
        self.erasable = erasable

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        """The newest entry of ``key`` (None: no such key, or deleted);
        ``consistent``: the leader's answer, not a possibly lagging follower's."""
        try:
            e = await (self._leader if consistent else self._kv).get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if e.value is None or e.revision is None:
            return None
        return Entry(key, e.value, e.revision)

    async def create(self, key: str, value: bytes) -> int:
        """Store ``key`` if it does not exist; its revision.

        Raises:
            WrongLastSequence: the key exists.
        """
        with _translated():
            return int(await self._kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Store ``key`` if its newest revision is still ``last``; the new revision.

        Raises:
            WrongLastSequence: someone wrote first (read again and retry).
        """
        with _translated():
            return int(await self._kv.update(key, value, last=last))

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._kv.put(key, value))

    async def entries(self, pattern: str = ">", *, limit: int = 10_000) -> list[Entry]:
        """The newest entry of every key matching ``pattern`` (at most
        ``limit``; no deleted ones), in one pass of a watcher."""
        # Stopping a watcher does not delete its consumer, which nats-py
        # otherwise asks the server to keep for 5 min: one per listing.
        watcher = await self._kv.watch(pattern, ignore_deletes=True, inactive_threshold=10.0)
        out: list[Entry] = []
        try:
            async for e in watcher:
                if e is None:  # the initial values are all delivered
                    break
                if e.value and e.revision is not None:
                    out.append(Entry(e.key, e.value, e.revision))
                if len(out) >= limit:
                    break
        finally:
            await watcher.stop()
        return out

    async def follow(self, *, inactive_threshold: float = 30.0) -> AsyncIterator[Entry]:
        """Every key's newest entry, then each change as it is stored.
        ``inactive_threshold``: how long the server keeps the watch's consumer
        once its client is gone (nats-py's default is 5 min: a killed
        replica's would pile up); one the server dropped is recreated on
        missed heartbeats."""
        watcher = await self._kv.watchall(inactive_threshold=inactive_threshold)
        try:
            async for e in watcher:
                if e is None:  # the initial values are all delivered
                    continue
                yield Entry(e.key, e.value or b"", e.revision or 0, e.operation is not None)
        finally:
            await watcher.stop()

    async def erase_revision(self, revision: int) -> None:
        """Overwrite a replaced revision in the raw store (no-op if not erasable)."""
        if self.erasable:
            await self._bus.erase_messages(self.spec.stream, [revision])

    async def erase_history(self, key: str, *, keep_after: int) -> int:
        """Overwrite every revision of ``key`` before ``keep_after``; how many."""
        if not self.erasable:
            return 0
        return await self._bus.erase_subject(self.spec.stream, self.spec.subject(key),
                                              keep_after=keep_after)  # fmt: skip


def tls_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """The client side of TLS to NATS, or None for a plain connection.

    ``ca`` verifies the server (without it: the system's CAs); ``cert`` and
    ``key`` are this client's certificate for a server that verifies clients.
    """
    if ca is None and cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def connect(
    url: str,
    *,
    name: str,
    replicas: int = 1,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    creds: str | Path | None = None,
) -> Bus:
    """Connect to NATS (reconnecting forever once connected), over TLS when
    ``tls`` is given (see ``tls_context``), as the user of the ``.creds`` file
    ``creds`` (or of the URL's ``?creds=``, ``baton.urls.split_creds``).

    Raises:
        BusUnavailable: no server answered within ``timeout`` seconds.
    """

    url, in_url = split_creds(url)
    creds = creds or in_url
    user = urllib.parse.urlsplit(url).username
    if creds is not None:
        user = jwt.creds_name(creds)
    safe_url = redact(url)
    register(PERMISSION_VIOLATIONS)
    PERMISSION_VIOLATIONS.labels(name)  # the series exists from the start

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            PERMISSION_VIOLATIONS.labels(name).inc()
            log.error("nats_permission_violation", error=str(exc))
            return
        log.warning("nats_error", error=repr(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected", url=safe_url)

    async def on_reconnect() -> None:
        log.info("nats_reconnected", url=safe_url)

    errors: list[Exception] = []

    async def on_first_error(exc: Exception) -> None:
        errors.append(exc)

    # nats-py retries an unreachable server forever when reconnects are on, so
    # the first connection is bounded here and the callbacks swapped after it.
    nc = NATS()
    coalesce_writes(nc)
    try:
        await asyncio.wait_for(
            nc.connect(
                # A cluster is a comma-separated list; nats-py also learns the
                # other nodes from the server and fails over among them.
                servers=[u.strip() for u in url.split(",") if u.strip()],
                name=name,
                # Replies to this service land under its own prefix, which
                # its permissions allow and no other identity's do.
                inbox_prefix=inbox_prefix(user) if user in SERVICES else "_INBOX",
                # A paused or partitioned server is noticed after ~3 missed
                # pings (default: 2 x 120 s, during which nothing moves).
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=3,
                connect_timeout=max(1, int(min(2.0, timeout))),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_first_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                tls=tls,
                user_credentials=str(creds) if creds is not None else None,
            ),
            timeout,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise BusUnavailable(safe_url, errors[-1] if errors else exc) from exc
    # nats-py upgrades to TLS only when the server's INFO asks for it: a
    # client configured for TLS refuses a server that does not.
    if tls is not None and not nc._server_info.get("tls_required"):
        await nc.close()
        refused = ConnectionError("TLS is configured but the server does not offer it")
        raise BusUnavailable(safe_url, refused)
    nc._error_cb = on_error
    return Bus(nc, replicas=replicas)


async def _coalescing_flusher(nc: NATS) -> None:
    """nats-py's socket writer, waiting one more pass of the event loop
    before it writes.

    nats-py queues every command and wakes its flusher task once, which
    writes whatever is pending then. A transition's publishes, the acks of a
    batch of deliveries and the requests of concurrent handlers are made by
    tasks that run in the *same* loop pass as the flusher or the one after, so
    the stock flusher writes them one syscall each (the socket write was the
    largest single cost in every service's profile). Yielding once lets them
    join one write; a lone message waits one loop pass (microseconds)."""
    queue = nc._flush_queue
    assert queue is not None
    while nc.is_connected and not nc.is_connecting:
        waiting = [await queue.get()]
        try:
            await asyncio.sleep(0)
            while not queue.empty():  # flush requests that joined meanwhile
                waiting.append(queue.get_nowait())
            if nc._pending_data_size > 0:
                pending, nc._pending, nc._pending_data_size = nc._pending, [], 0
                assert nc._transport is not None
                nc._transport.writelines(pending)
                await nc._transport.drain()
        except OSError as exc:
            await nc._error_cb(exc)
            await nc._process_op_err(exc)
            break
        except (asyncio.CancelledError, RuntimeError, AttributeError):
            break
        finally:
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)


def coalesce_writes(nc: NATS) -> None:
    """Give ``nc`` the coalescing flusher (kept across reconnects: nats-py
    starts its flusher through the instance's ``_flusher``)."""
    if not hasattr(nc, "_flusher") or not hasattr(nc, "_pending_data_size"):
        return  # another nats-py: its own flusher stays
    nc._flusher = lambda: _coalescing_flusher(nc)  # type: ignore[method-assign]


__all__ = [
    "TRANSIENT",
    "Bucket",
    "Bus",
    "BusClosed",
    "BusUnavailable",
    "Delivery",
    "Entry",
    "Gate",
    "Handler",
    "Msg",
    "Nak",
    "NotFound",
    "Outcome",
    "Puller",
    "Request",
    "Responder",
    "Settlement",
    "Term",
    "TransportError",
    "WrongLastSequence",
    "connect",
    "settlement",
    "tls_context",
]
