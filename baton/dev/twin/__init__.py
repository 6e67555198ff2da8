"""The bus twin: an in-memory simulator of the part of ``baton.bus.Bus``
that the service shells hold — the orchestrator's conductor and intake, the
worker's job handler — so they run in milliseconds, in one process, with no
nats-server (httpx's ``MockTransport``, FastStream's ``TestNatsBroker``).

Dev tooling, never the runtime. It is the same class surface, not a
look-alike: ``TwinBus`` subclasses ``Bus`` and ``TwinBucket`` subclasses
``Bucket`` (mypy checks every override against the real signature), a handler
is handed the real ``Delivery`` (around a message in nats-py's own shape), and
the pull loop and its settlement are the real ones, inherited: ``Bus.consume``
-> ``settle`` -> ``outcomes.settlement`` -> ack / nak / term / dead letter.
In parts: ``streams`` (streams, consumers, the delivered message), ``client``
(pull requests, inboxes), ``bucket`` (``TwinBucket``), ``bus`` (``TwinBus``).

Simulated (each pinned against a real nats-server by ``tests/test_bus_twin.py``):

* JetStream publish: streams by subject, ``Nats-Msg-Id`` de-duplicated within
  the stream's ``duplicate_window``; work-queue retention drops what is acked.
* Pull consumers: ``ack``; ``nak(delay)`` redelivered after the delay;
  ``term``; an unsettled delivery redelivered after ``ack_wait`` (extended by
  ``in_progress``); no redelivery past ``max_deliver``; a message deleted
  (``erase_messages``) while out or due again is settled, as by an ack.
* Pull requests, the one wire of ``Bus.consume``'s loop: the twin's stand-in
  for nats-py's client (``client``) takes an inbox and the request nats-py
  would publish, and answers as nats-server does — messages as they come, a
  100 heartbeat per idle interval, a 408 with what is left at expiry, nothing
  once the batch is full, a request dropped once its inbox has no listener,
  a 503 with no consumer.
* buckets (``ensure_bucket``): revisions, ``create`` / ``update`` compare-and-set
  (``WrongLastSequence``), and ``before_write``, a hook to inject a race
  (another replica writing between a read and a write).
* Core NATS: ``notify`` / typed ``subscribe``; ``serve`` / ``request`` (no
  responder: ``NoRespondersError``, as nats-py raises; a responder answering
  None: ``TimeoutError`` at once, the timeout is not waited out).

Not simulated (a call raises ``NotImplementedError``: test it on a real
server): stream reads and replays (but ``last_msg``), ``publish_if_last``, bucket watches
(none of the shells follows a bucket), accounts, ``max_ack_pending``, ``max_waiting``,
reconnects, lagging replicas. Time: the twin's clock is the wall clock plus
``advance()``'s skew, which moves nak delays, ack waits, pull request expiry and
heartbeats and the de-duplication window without waiting.

Tests drive it two ways: the real loops (``consume``), or one delivery at a
time in an order they choose (``deliver``; ``ready`` lists what may come).
"""

from .bucket import TwinBucket
from .bus import TwinBus
from .streams import matches

__all__ = ["TwinBucket", "TwinBus", "matches"]
