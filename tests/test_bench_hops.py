"""Sequential round trips counted from the bus (bench/hops.py), on messages
as a ``>`` subscription sees them, with their arrival times: no broker."""

from __future__ import annotations

from bench.hops import _round_trips, _sequential


def test_a_request_answered_by_a_relayed_publish_is_one_round_trip_to_its_ack() -> None:
    # The worker's ``answer``: the store appends (a round trip of its own,
    # inside), then publishes the result with the worker's inbox as the reply
    # subject; the worker waits from its request to JetStream's ack.
    seen = [
        (1.0, "baton.ctx.answer.acme", "_INBOX_inference-worker.b.2"),
        (2.0, "baton.ctxlog.acme.s1", "_INBOX_context-store.c.1"),
        (3.0, "_INBOX_context-store.c.1", ""),
        (4.0, "baton.results.acme.t1", "_INBOX_inference-worker.b.2"),
        (5.0, "_INBOX_inference-worker.b.2", ""),
    ]
    trips = _round_trips(seen)
    assert sorted(trips) == [(1.0, 5.0, "_INBOX_inference-worker"),
                             (2.0, 3.0, "_INBOX_context-store")]  # fmt: skip
    assert _sequential(trips) == 2  # the request, and the append waited for inside it
