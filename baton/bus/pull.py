"""The long-lived pull request behind ``Bus.consume``.

nats-py's ``PullSubscription.fetch`` sends a new ``CONSUMER.MSG.NEXT``
request for every batch (often two: a ``no_wait`` probe, then a lingering
one), so an idle consumer asked once per idle timeout and a busy one once per
batch. A ``PullStream`` keeps one inbox and a request open instead:

* a request asks for the loop's free room only (its free handler slots and its
  gate's room, less what is already asked for or waiting to be handed over),
  so the server never holds more for this loop than it may take;
* what is outstanding is counted (JetStream ADR-37): plus a request's batch,
  minus each delivered message, minus ``Nats-Pending-Messages`` of a 408/409
  that ended a request; a top-up is sent once the free room is at least what
  is still outstanding (or nothing is), so a busy loop asks about once per
  half of its room, not once per message;
* each request lives ``EXPIRES`` seconds with server heartbeats every
  ``HEARTBEAT``; silence for two beats (a request lost with its server), a
  reconnect, or a status that ends requests without saying how many, resets
  the count and asks again;
* a gate's room may shrink under an open request (another tenant borrowed,
  the KV cache filled): what arrives beyond the room is held (kept alive)
  rather than exceed the gate, and the open requests are withdrawn by moving
  to a new inbox. A reset after a reconnect may leave an old request alive:
  what it delivers beyond the room is held in the same way.

Stopping drains the inbox (the server drops requests nobody listens to) and
naks what was delivered but not handed over, so it is redelivered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto.streams import ConsumerSpec

from .delivery import Delivery, _KeepAlive

log = structlog.get_logger("baton.bus")

EXPIRES = 30.0  # seconds a pull request stays open on the server
HEARTBEAT = 2.0  # the server's idle heartbeat on an open request (one message per
# idle request every 2 s, against a request and its 408 every second before)
CHECK_EVERY = 1.0  # the loop looks for a reconnect or lost heartbeats this often
MAX_BATCH = 256  # no request asks for more, whatever the room
HDR_STATUS = "Status"
HDR_DESCRIPTION = "Description"
HDR_PENDING = "Nats-Pending-Messages"  # what a request ended without delivering


class PullStream:
    """One consumer's inbox and its open pull requests. ``wake`` is called
    whenever something arrives that the loop should look at."""

    def __init__(
        self, nc: NATS, api_prefix: str, spec: ConsumerSpec, wake: Callable[[], None]
    ) -> None:
        self.spec = spec
        self.ready: deque[Delivery] = deque()  # delivered, not yet handed over
        self.outstanding = 0  # asked for and not yet delivered (nor ended)
        self.requests = 0  # pull requests sent (tests and benchmarks read it)
        self.failure = ""  # a status that ended requests without a count
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._inbox = nc.new_inbox()
        self._wake = wake
        self._sub: Subscription | None = None
        self._heard = time.monotonic()  # last request sent or message heard
        self._reconnects = nc.stats["reconnects"]
        self._held: dict[int, _KeepAlive] = {}
        self._cancelled = 0.0

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get(HDR_STATUS) if headers else None
        if not status:
            self.outstanding = max(0, self.outstanding - 1)
            self.ready.append(Delivery(msg))
        elif status == "100":  # idle heartbeat: the request is alive
            return
        elif headers and HDR_PENDING in headers:  # 408 expired, 409 ended: n undelivered
            self.outstanding = max(0, self.outstanding - int(headers[HDR_PENDING]))
        else:  # e.g. 409 Consumer Deleted / Exceeded MaxWaiting, 400
            description = headers.get(HDR_DESCRIPTION, "") if headers else ""
            self.failure = " ".join(f"{status} {description}".split())  # one line in the log
        self._wake()

    async def request(self, n: int) -> None:
        """Ask for ``n`` more messages (raises what nats-py's publish raises)."""
        body = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            n, int(EXPIRES * 1e9), int(HEARTBEAT * 1e9))  # fmt: skip
        await self._nc.publish(self._next, body, reply=self._inbox)
        self.outstanding += n
        self.requests += 1
        self._heard = time.monotonic()

    def lost(self) -> str:
        """Why the open requests must be taken as gone ("" if they need not):
        a reconnect (a restarted server forgot them) or heartbeats missed.
        The count is reset, so the loop asks again."""
        reason = ""
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects, reason = reconnects, "reconnected"
        elif self.outstanding and time.monotonic() - self._heard > 2 * HEARTBEAT + 0.5:
            reason = "heartbeat_missed"
        elif self.failure:
            reason, self.failure = self.failure, ""
        if reason:
            self.outstanding = 0
            self._heard = time.monotonic()
        return reason

    async def cancel(self) -> None:
        """Withdraw the open requests (the room shrank under them): listen on
        a new inbox and drain the old one, whose requests the server drops
        once nobody listens; what was already on its way still arrives."""
        if time.monotonic() - self._cancelled < CHECK_EVERY:
            return  # at most once a second; meanwhile arrivals are held
        self._cancelled = time.monotonic()
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=self._on_msg)
        old, self._sub, self._inbox = self._sub, sub, inbox
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.drain(), 2.0)
        self.outstanding = 0

    def hold(self, delivery: Delivery) -> None:
        """``delivery`` waits for room: keep it from being redelivered."""
        if delivery.stream_seq not in self._held:
            self._held[delivery.stream_seq] = _KeepAlive(delivery, self.spec.ack_wait / 3)

    def take(self) -> Delivery:
        d = self.ready.popleft()
        if self._held:
            keepalive = self._held.pop(d.stream_seq, None)
            if keepalive is not None:
                keepalive.cancel()
        return d

    async def close(self) -> None:
        """Stop listening (the server drops requests without interest) and
        nak what was delivered but not handed over."""
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.drain(), 2.0)
        while self.ready:
            d = self.take()
            with contextlib.suppress(Exception):
                await d.nak()
