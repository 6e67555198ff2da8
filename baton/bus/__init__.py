"""The one door to NATS every Baton service uses. Nothing outside this
package talks to nats-py (``tests/test_fences.py``); its public surface is
this module's ``__all__``, pinned by ``tests/test_bus_surface.py``.

* ``connect`` — connect with reconnect, or raise ``BusUnavailable`` clearly
  (``connection.py``; the coalescing socket writer: ``flusher.py``).
* ``Bus.provision`` — create/update streams, consumers and buckets
  idempotently, retrying JetStream's transient "error creating store"
  (``provision.py``, configurations in ``config.py``).
* ``Bus.publish`` — JetStream publish with ``Nats-Msg-Id``, ``Baton-Task-Id``
  and the current trace context (W3C ``traceparent``/``tracestate``, through
  OpenTelemetry's propagator: ``baton.tracing``); every handler (``consume``,
  ``serve``) runs in the trace context of the message it handles
  (``messaging.py``).
* ``Bus.consume`` — a pull loop that keeps one pull request open for its free
  room (slots and gate; ``pull.py``), runs handlers concurrently, keeps long
  handlers alive with ``in_progress``, and turns each handler's outcome into
  ack / nak-with-delay / term (``consume.py``; the rule: ``outcomes.settlement``).
  It returns a ``Consumption``: ``stop()`` ends that loop alone, awaiting it
  waits until it has ended.
* ``Bus.request`` / ``subscribe`` / ``notify`` / ``serve`` — core NATS, typed
  replies (``messaging.py``).
* ``Bus.ordered`` / ``read_subject`` — replay a stream (and follow it live);
  what they hand back are Baton's own types (``types.py``: ``Message``,
  ``Subscription``, ``Published``, ``StreamState``, ``Consumer``);
  ``stream_info``, ``subjects``, ``get_msg``, ``last_msg``, ``publish_if_last``,
  ``purge``; ``erase_messages`` / ``erase_subject`` overwrite the raw store
  (``streams.py``).
* ``Bucket`` (from ``Bus.ensure_bucket``) — reads, compare-and-set writes,
  watches, erasure of replaced revisions (``bucket.py``).
* ``Bus.account(prefix)`` — the same helpers on another account's JetStream.

Errors callers act on arrive as ``NotFound``, ``WrongLastSequence``,
``BusClosed`` (or the ``TRANSIENT`` tuple, for retrying an idempotent
operation): ``errors.py`` draws their tree.

Handler outcomes are explicit::

    return normally   -> ack
    raise Nak(delay)  -> nak, redelivered after ``delay`` seconds (doubling per
                         delivery with ``backoff=True``: a peer or engine down)
    raise Term(why)   -> term (poison: never redelivered), dead-lettered
    any other error   -> nak with back-off; on the last delivery, term + dead letter

On a consumer with ``erase_handled`` the message is erased first, and an
erasure that succeeded is the ack (JetStream settles a deleted message).
"""

from .bucket import Bucket, Entry
from .client import Bus
from .connection import connect, tls_context
from .consume import Consumption
from .delivery import (
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    HDR_MSG_ID,
    HDR_TASK_ID,
    HDR_TRACEPARENT,
    Delivery,
    Gate,
    Handler,
    Puller,
    Request,
    Responder,
)
from .errors import (
    TRANSIENT,
    BusClosed,
    BusUnavailable,
    NotFound,
    TransportError,
    WrongLastSequence,
)
from .outcomes import Nak, Outcome, Settlement, Term, settlement
from .streams import DIRECT_LOOKUPS
from .types import Consumer, Message, Published, StreamState, Subscription

__all__ = [
    "DIRECT_LOOKUPS",
    "HDR_DLQ_REASON",
    "HDR_DLQ_SUBJECT",
    "HDR_EXPECTED_LAST_SUBJECT_SEQ",
    "HDR_MSG_ID",
    "HDR_TASK_ID",
    "HDR_TRACEPARENT",
    "TRANSIENT",
    "Bucket",
    "Bus",
    "BusClosed",
    "BusUnavailable",
    "Consumer",
    "Consumption",
    "Delivery",
    "Entry",
    "Gate",
    "Handler",
    "Message",
    "Nak",
    "NotFound",
    "Outcome",
    "Published",
    "Puller",
    "Request",
    "Responder",
    "Settlement",
    "StreamState",
    "Subscription",
    "Term",
    "TransportError",
    "WrongLastSequence",
    "connect",
    "settlement",
    "tls_context",
]
