"""The one NATS transport every Baton service uses.

* ``connect`` — connect with reconnect, or raise ``BusUnavailable`` clearly.
* ``Bus.provision`` — create/update streams, consumers and KV buckets
  idempotently (retrying JetStream's transient "error creating store").
* ``Bus.publish`` — JetStream publish with ``Nats-Msg-Id``, ``Baton-Task-Id``
  and a W3C ``traceparent`` header.
* ``Bus.consume`` — a pull loop that fetches in batches with a short timeout,
  runs handlers concurrently, keeps long handlers alive with ``in_progress``,
  and turns each handler's outcome into ack / nak-with-delay / term.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from baton import tracing
from baton.accounts import SERVICES, inbox_prefix
from baton.erase import erase_messages
from baton.metrics import DEAD_LETTERS, MESSAGES_HANDLED, PERMISSION_VIOLATIONS
from baton.urls import redact
from proto import codec, keys, subjects
from proto.streams import BucketSpec, ConsumerSpec, StreamSpec

log = structlog.get_logger("baton.transport")

HDR_MSG_ID = "Nats-Msg-Id"
HDR_TASK_ID = "Baton-Task-Id"
HDR_TRACEPARENT = "traceparent"
HDR_DLQ_REASON = "Baton-Dead-Letter-Reason"
HDR_DLQ_SUBJECT = "Baton-Original-Subject"

PING_INTERVAL = 5  # seconds; see connect()
_STORE_RACE_ERR = 10049  # "error creating store for stream": transient, retry


class TransportError(Exception):
    """Base class of transport failures."""


class BusUnavailable(TransportError):
    """NATS could not be reached."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        super().__init__(f"cannot reach NATS at {url}: {cause or 'no server answered'}")
        self.url = url


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
    last delivery; ``Term`` -> term (dead-lettered unless it says not to); any
    other error -> nak with exponential back-off (0.5 s doubling, at most
    30 s), dead-lettered on the last delivery. ``max_deliver <= 0``: no last
    delivery."""
    last = 0 < max_deliver <= num_delivered
    if error is None:
        return Settlement("ack")
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
    headers[HDR_TRACEPARENT] = tracing.child_of(tracing.current())
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


@dataclass
class Puller:
    """A bound pull subscription: ``fetch`` up to ``n`` messages."""

    spec: ConsumerSpec
    sub: JetStreamContext.PullSubscription

    async def fetch(self, n: int, timeout: float) -> list[Delivery]:
        """Up to ``n`` messages, waiting at most ``timeout`` for the first.
        A transient failure (NATS restarting) is logged and yields nothing;
        a closed connection raises ``ConnectionClosedError``.

        Long waits should ask for one message: a batch fetch that meets the
        late 408 of an expired earlier pull request re-issues its request, and
        a message delivered to that request then sits until the whole batch
        timeout ends (measured: p99 step latency 770 ms instead of ms)."""
        try:
            msgs = await self.sub.fetch(batch=max(1, n), timeout=timeout)
        except TimeoutError:  # nats-py raises both its own and asyncio's
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
            raise
        except Exception as exc:
            log.warning("fetch_failed", consumer=self.spec.durable, error=repr(exc))
            await asyncio.sleep(0.5)
            return []
        return [Delivery(m) for m in msgs]


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
        subjects=[f"$KV.{spec.name}.>"],
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
# provisioning waits for it instead of failing the service's start.
_TRANSIENT_JS = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
PROVISION_PATIENCE = 60.0  # seconds


async def _retry_store_race(op: Callable[[], Awaitable[Any]], attempts: int = 8) -> Any:
    deadline = time.monotonic() + PROVISION_PATIENCE
    attempt = 0
    while True:
        try:
            return await op()
        except _TRANSIENT_JS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("jetstream_unavailable_retrying", error=type(exc).__name__)
            await asyncio.sleep(0.5)
        except nats.js.errors.APIError as exc:
            attempt += 1
            if exc.err_code != _STORE_RACE_ERR or attempt >= attempts:
                raise
            await asyncio.sleep(0.5)


class Bus:
    """A connected NATS client plus JetStream, shared by one service process."""

    def __init__(self, nc: NATS, *, replicas: int = 1) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.replicas = replicas
        self._stopping = asyncio.Event()

    # -- provisioning ------------------------------------------------------

    def account_js(self, api_prefix: str) -> JetStreamContext:
        """JetStream of another account whose API this account imports under
        ``api_prefix`` (a tenant's, as ``$JS.<tenant>.API``)."""
        return self.nc.jetstream(prefix=api_prefix)

    async def reaches_account(self, api_prefix: str, timeout: float = 2.0) -> bool:
        """True when another account's JetStream answers under ``api_prefix``
        (one try: a NATS without that import has nothing to wait for)."""
        try:
            await self.nc.jetstream(prefix=api_prefix, timeout=timeout).account_info()
        except _TRANSIENT_JS:
            return False
        return True

    async def ensure_stream(self, spec: StreamSpec, *, api_prefix: str | None = None) -> None:
        """Create or update the stream (in another account with ``api_prefix``)."""
        js = self.js if api_prefix is None else self.account_js(api_prefix)
        config = _stream_config(spec, self.replicas)
        try:
            await _retry_store_race(lambda: js.add_stream(config))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # stream name in use with a different config
                raise
            await js.update_stream(config)

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the durable consumer, or update its mutable fields in place
        (the server keeps its position and pending messages)."""
        config = _consumer_config(spec)
        await _retry_store_race(lambda: self.js.add_consumer(spec.stream, config))

    async def ensure_bucket(self, spec: BucketSpec) -> KeyValue:
        if spec.erasable:
            return await self._ensure_erasable_bucket(spec)
        kv: KeyValue = await _retry_store_race(
            lambda: self.js.create_key_value(
                bucket=spec.name,
                history=spec.history,
                ttl=spec.ttl or None,
                replicas=self.replicas,
                direct=True,
                description=spec.description or None,
            )
        )
        return kv

    async def _ensure_erasable_bucket(self, spec: BucketSpec) -> KeyValue:
        config = _bucket_config(spec, self.replicas)
        try:
            await _retry_store_race(lambda: self.js.add_stream(config))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # exists with another config
                raise
            info = await self.js.stream_info(spec.stream)
            if info.config.deny_delete:
                # Created before erasure support: deletes can never be allowed on
                # it. It keeps working; erasure falls back to KV purges.
                log.warning("bucket_not_erasable", bucket=spec.name)
            else:
                await self.js.update_stream(config)
        kv: KeyValue = await self.js.key_value(spec.name)
        return kv

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

    # -- consuming ---------------------------------------------------------

    async def puller(self, spec: ConsumerSpec) -> Puller:
        # Series exist from the start, so the first dead letter is an increase.
        DEAD_LETTERS.labels(spec.durable)
        for outcome in ("ack", "nak", "term"):
            MESSAGES_HANDLED.labels(spec.durable, outcome)
        sub = await self.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        return Puller(spec=spec, sub=sub)

    async def settle(self, spec: ConsumerSpec, delivery: Delivery, handler: Handler) -> None:
        """Run ``handler`` on one delivery and settle it by outcome."""
        parent = delivery.headers.get(HDR_TRACEPARENT)
        token = tracing.set_current(tracing.child_of(parent))
        bound = {"consumer": spec.durable, "trace_id": tracing.trace_id(tracing.current())}
        if delivery.task_id:
            bound["task_id"] = delivery.task_id
        try:
            with structlog.contextvars.bound_contextvars(**bound):
                await self._settle(spec, delivery, handler)
        finally:
            tracing._current.reset(token)

    async def erase(self, delivery: Delivery) -> None:
        """Overwrite ``delivery``'s message in the store (``STREAM.MSG.DELETE``
        with erase) before it is acked: a work queue's ack only unlinks it.
        Best effort: a failure is logged and the message is settled anyway."""
        try:
            await erase_messages(self.js, delivery.msg.metadata.stream, [delivery.stream_seq])
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
        fetch_timeout: float = 0.05,
        idle_timeout: float = 1.0,
    ) -> None:
        """Pull and handle messages until ``stop()``; at most ``concurrency``
        handlers run at once. In-flight handlers finish before it returns."""
        puller = await self.puller(spec)
        running: set[asyncio.Task[None]] = set()
        while not self._stopping.is_set():
            free = concurrency - len(running)
            if free <= 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # Busy: batches with short waits, so finished slots refill
                # quickly. Idle: one message with a long wait (see Puller.fetch).
                if running:
                    batch = await puller.fetch(free, fetch_timeout)
                else:
                    batch = await puller.fetch(1, idle_timeout)
            except nats.errors.ConnectionClosedError:
                break
            for d in batch:
                task = asyncio.create_task(self.settle(spec, d, handler))
                running.add(task)
                task.add_done_callback(running.discard)
        if running:
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

    async def close(self) -> None:
        """Flush what was published and close. (Not ``drain``: nats-py waits
        out its whole drain timeout on a bound pull subscription.)"""
        self.stop()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()


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
) -> Bus:
    """Connect to NATS (reconnecting forever once connected), over TLS when
    ``tls`` is given (see ``tls_context``).

    Raises:
        BusUnavailable: no server answered within ``timeout`` seconds.
    """

    user = urllib.parse.urlsplit(url).username
    safe_url = redact(url)
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


def is_duplicate_error(exc: BaseException) -> bool:
    """True for a KV ``create`` on an existing key."""
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError)


__all__ = [
    "Bus",
    "BusUnavailable",
    "Delivery",
    "Handler",
    "Nak",
    "Outcome",
    "Puller",
    "Settlement",
    "Term",
    "TransportError",
    "connect",
    "is_duplicate_error",
    "settlement",
    "tls_context",
]
