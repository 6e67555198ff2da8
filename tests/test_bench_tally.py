"""The per-kind message tally of the orchestrator benchmark (bench/tally.py),
on messages as a ``>`` subscription sees them: no broker needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.tally import SERVER, KindTap


@dataclass
class Seen:
    subject: str
    reply: str = ""
    data: bytes = b""
    headers: dict[str, str] | None = field(default=None)


def _step(tap: KindTap) -> None:
    """One step's worth, as the tap sees it, in order."""
    ack = "$JS.ACK.BATON_JOBS.worker-default.1.7.7.1.0"
    for msg in (
        Seen("$KV.baton-runs.acme.t1", "_INBOX_orchestrator.a.1"),  # the CAS
        Seen("_INBOX_orchestrator.a.1", data=b"{}"),  # its ack
        Seen("baton.jobs.default", "_INBOX_orchestrator.a.2"),  # the job publish
        Seen("_INBOX_orchestrator.a.2"),  # its publish ack
        Seen("baton.jobs.default", ack),  # the delivery, on the stream's subject
        Seen("baton.ctx.window.acme", "_INBOX_inference-worker.b.1"),
        Seen("_INBOX_inference-worker.b.1"),  # the window
        Seen(ack, data=b"+WPI"),  # kept alive
        Seen(ack, data=b""),  # acked
        Seen("$JS.API.STREAM.MSG.DELETE.BATON_TASKS_acme", "_INBOX_orchestrator.a.3"),
        Seen("_INBOX_orchestrator.a.3"),
        Seen("_INBOX_orchestrator.pull9", headers={"Status": "100"}),  # a pull's heartbeat
        Seen("baton.workers.heartbeat.default.w1"),  # a core broadcast
    ):
        tap.see(msg)  # type: ignore[arg-type]


def test_each_message_counts_once_for_its_sender_and_once_per_receiver() -> None:
    tap = KindTap()
    _step(tap)
    assert tap.sent["orchestrator"] == {
        "kv write $KV.baton-runs": 1,
        "publish baton.jobs": 1,
        "erase BATON_TASKS_<tenant>": 1,
    }
    assert tap.received["orchestrator"] == {
        "kv ack $KV.baton-runs": 1,
        "publish ack baton.jobs": 1,
        "erase reply BATON_TASKS_<tenant>": 1,
        "pull status 100": 1,
        "core baton.workers": 1,
    }
    assert tap.sent["inference-worker"] == {
        "ctx request window": 1,
        "in_progress worker-default": 1,
        "ack worker-default": 1,
        "core baton.workers": 1,
    }
    assert tap.received["inference-worker"] == {
        "delivery worker-default": 1,
        "ctx reply window": 1,
        "core baton.workers": 1,
    }
    assert tap.sent["context-store"] == {"ctx reply window": 1}
    assert tap.received["context-store"] == {"ctx request window": 1}
    assert tap.sent[SERVER]["delivery worker-default"] == 1


def test_per_step_divides_and_sorts_by_count() -> None:
    tap = KindTap()
    for _ in range(4):
        _step(tap)
    out = tap.per_step(2, ("orchestrator", "context-store"))
    assert out["orchestrator"]["sent"] == 6.0
    assert out["orchestrator"]["received"] == 10.0
    assert out["context-store"] == {
        "sent": 2.0,
        "sent_by_kind": {"ctx reply window": 2.0},
        "received": 2.0,
        "received_by_kind": {"ctx request window": 2.0},
    }


def test_a_publish_answering_a_request_counts_for_the_answerer_and_acks_the_asker() -> None:
    # The context store's ``answer``: it publishes the job's result with the
    # worker's inbox as the reply subject, and JetStream's ack is the reply.
    tap = KindTap()
    for msg in (
        Seen("baton.ctx.answer.acme", "_INBOX_inference-worker.b.2"),
        Seen("baton.ctxlog.acme.s1", "_INBOX_context-store.c.1"),
        Seen("_INBOX_context-store.c.1"),  # the answer's append, stored
        Seen("baton.results.acme.t1", "_INBOX_inference-worker.b.2"),
        Seen("_INBOX_inference-worker.b.2"),  # JetStream's ack of the result
    ):
        tap.see(msg)  # type: ignore[arg-type]
    assert tap.sent["inference-worker"] == {"ctx request answer": 1}
    assert tap.received["inference-worker"] == {"publish ack baton.results": 1}
    assert tap.sent["context-store"] == {"publish baton.ctxlog": 1, "publish baton.results": 1}
    assert tap.received["context-store"] == {"ctx request answer": 1, "publish ack baton.ctxlog": 1}
