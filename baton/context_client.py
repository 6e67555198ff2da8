"""The one client of the context store's request-reply API, for every
service: the op's subject, its typed reply (from the contract table,
``proto/context_api.py``), one ``TIMEOUT``, and one policy for a store that
does not answer in time, by what is waiting for it:

* a JetStream message (the conductor, the inference worker, the tool
  worker; ``call``): ``Nak(NAK_DELAY, backoff=True)``, so the message is
  redelivered when a store replica may be back (every op is idempotent) and
  later at each further delivery (1, 2, 4, 8 s...); a flat second used up an
  inference job's five deliveries while a store restarted (the chaos tier);
* an HTTP request (the OpenAI route's seed, the console; ``ask``): the
  error ``context_unavailable`` (503), which its client may retry."""

from __future__ import annotations

import json
from typing import Final, Protocol, TypeVar

from baton.bus import TRANSIENT, Bus, Nak
from baton.http_errors import ApiError
from proto import codec, subjects
from proto.context_api import ANSWER, Endpoint
from proto.errors import ErrorCode
from proto.messages import ContextAnswer, ContextAppendReply


class _Request(Protocol):
    @property
    def tenant(self) -> str: ...


Q = TypeVar("Q", bound=_Request)
P = TypeVar("P")

TIMEOUT: Final = 5.0  # seconds a request waits for its reply (the store retries for 3)
NAK_DELAY: Final = 1.0  # seconds before a message whose request timed out comes back
UNANSWERED: Final[tuple[type[BaseException], ...]] = (TimeoutError, *TRANSIENT)


async def call(bus: Bus, endpoint: Endpoint[Q, P], request: Q, *, task_id: str | None = None) -> P:
    """Ask the context store ``endpoint.op`` for the request's tenant; its typed reply
    (a refusal is a reply: its ``error`` is set).

    Raises:
        Nak: no store answered within ``TIMEOUT`` (or none is subscribed, or
            NATS is reconnecting).
    """
    try:
        return await bus.request(subjects.context_api(endpoint.op, request.tenant), request,
                                 endpoint.reply, timeout=TIMEOUT, task_id=task_id)  # fmt: skip
    except UNANSWERED as exc:
        raise Nak(NAK_DELAY, f"context store did not answer {endpoint.op}", backoff=True) from exc


async def answer(
    bus: Bus, request: ContextAnswer, *, task_id: str | None = None
) -> ContextAppendReply:
    """Store a job's answer or a tool call's output and publish its result
    (``ContextAnswer``). The reply is JetStream's ack of the result (JSON;
    the store's own replies are msgpack, never ``{``): an empty
    ``ContextAppendReply`` then, or the store's own reply: its refusal
    (``error`` set), or a tool output stored before (``duplicate``, its
    ``ref``; nothing published).

    Raises:
        Nak: no answer within ``TIMEOUT`` (nor a store subscribed, or NATS
            reconnecting), or JetStream refused the result: every part is
            idempotent, so the job's redelivery asks again.
    """
    subject = subjects.context_api(ANSWER.op, request.tenant)
    try:
        data = await bus.request_raw(subject, codec.encode(request), timeout=TIMEOUT,
                                     task_id=task_id)  # fmt: skip
    except UNANSWERED as exc:
        raise Nak(NAK_DELAY, "the answer's result was not acked", backoff=True) from exc
    if data[:1] != b"{":
        return codec.decode(data, ContextAppendReply)
    ack = json.loads(data)
    if "error" in ack:
        raise Nak(NAK_DELAY, f"the answer's result was refused: {ack['error']}", backoff=True)
    return ContextAppendReply()


async def ask(bus: Bus, endpoint: Endpoint[Q, P], request: Q, *, task_id: str | None = None) -> P:
    """``call`` for an HTTP handler: the same request and reply.

    Raises:
        ApiError: ``context_unavailable`` (503) when no store answered within
            ``TIMEOUT`` (or none is subscribed, or NATS is reconnecting).
    """
    try:
        return await call(bus, endpoint, request, task_id=task_id)
    except Nak as exc:
        raise ApiError(ErrorCode.CONTEXT_UNAVAILABLE, str(exc.reason)) from exc
