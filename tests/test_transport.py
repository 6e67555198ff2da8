"""The transport against a real nats-server: provisioning, dedupe, handler
outcomes (ack / nak / term / dead letter), header propagation, connect errors."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import structlog

from baton import tracing
from baton.bus import (
    DIRECT_LOOKUPS,
    HDR_DLQ_REASON,
    HDR_TASK_ID,
    HDR_TRACEPARENT,
    Bus,
    BusUnavailable,
    Delivery,
    Nak,
    Request,
    Term,
    WrongLastSequence,
    connect,
)
from baton.dev.testing import uid
from baton.natsd import free_port
from proto.messages import DocumentsErased
from proto.streams import DEAD_LETTERS, BucketSpec, ConsumerSpec, StreamSpec


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await connect(nats_url, name="test")
    await b.provision(streams=[DEAD_LETTERS])
    yield b
    await b.close()


async def _work_stream(bus: Bus, max_deliver: int = 3) -> tuple[str, ConsumerSpec]:
    name = uid("S")
    stream = StreamSpec(name=name, subjects=(f"{name}.>",), retention="workqueue",
                        duplicate_window=60)  # fmt: skip
    consumer = ConsumerSpec(stream=name, durable=uid("c"), filter_subject=f"{name}.>",
                            ack_wait=2.0, max_deliver=max_deliver)  # fmt: skip
    await bus.provision(streams=[stream], consumers=[consumer])
    return name, consumer


async def _run_until(bus: Bus, consumer: ConsumerSpec, handler, done: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    task = bus.consume(consumer, handler)
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        bus.stop()
        await asyncio.wait_for(task, 10)
        bus._stopping.clear()


async def test_provisioning_twice_is_idempotent(bus: Bus) -> None:
    name, consumer = await _work_stream(bus)
    await _work_stream(bus)  # another one beside it
    stream = StreamSpec(name=name, subjects=(f"{name}.>",), retention="workqueue",
                        duplicate_window=60)  # fmt: skip
    await bus.provision(streams=[stream], consumers=[consumer])
    info = await bus._js.stream_info(name)
    assert info.config.name == name


async def test_publish_with_the_same_msg_id_is_stored_once(bus: Bus) -> None:
    name, _ = await _work_stream(bus)
    first = await bus.publish(f"{name}.x", b"a", msg_id="same")
    second = await bus.publish(f"{name}.x", b"a", msg_id="same")
    assert not first.duplicate and second.duplicate
    assert (await bus._js.stream_info(name)).state.messages == 1


async def test_handler_outcomes_map_to_ack_nak_and_term(bus: Bus) -> None:
    name, consumer = await _work_stream(bus)
    seen: Counter[str] = Counter()
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        kind = d.data.decode()
        seen[kind] += 1
        if kind == "nak-once" and d.num_delivered == 1:
            raise Nak(0.1)
        if kind == "poison":
            raise Term("poison")
        if seen["ok"] >= 1 and seen["nak-once"] >= 2 and seen["poison"] >= 1:
            done.set()

    for kind in ("poison", "nak-once", "ok"):
        await bus.publish(f"{name}.{kind}", kind.encode())
    await _run_until(bus, consumer, handler, done)
    await asyncio.sleep(2.5)  # past ack_wait: nothing may come back
    assert seen == {"ok": 1, "nak-once": 2, "poison": 1}
    assert (await bus._js.stream_info(name)).state.messages == 0


async def test_a_handler_that_always_fails_is_dead_lettered_after_max_deliver(bus: Bus) -> None:
    name, consumer = await _work_stream(bus, max_deliver=3)
    attempts = 0
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal attempts
        attempts += 1
        if attempts >= 3:
            asyncio.get_running_loop().call_later(0.3, done.set)
        raise RuntimeError("boom")

    await bus.publish(f"{name}.job", b"payload", task_id="t-dlq")
    dlq = await bus._js.pull_subscribe(f"baton.dlq.{consumer.durable}", durable=None,
                                      stream=DEAD_LETTERS.name)  # fmt: skip
    await _run_until(bus, consumer, handler, done)
    assert attempts == 3
    [copy] = await dlq.fetch(1, timeout=5)
    assert copy.data == b"payload"
    assert "boom" in copy.headers[HDR_DLQ_REASON]
    assert copy.headers[HDR_TASK_ID] == "t-dlq"


def _context() -> tracing.SpanContext:
    return tracing.span_context(random.getrandbits(128) or 1, random.getrandbits(64) or 1,
                                sampled=True)  # fmt: skip


async def test_task_id_and_trace_context_travel_with_every_hop(bus: Bus) -> None:
    name, consumer = await _work_stream(bus)
    sc = _context()
    with tracing.within(sc):
        await bus.publish(f"{name}.a", b"1", task_id="t42")
    assert tracing.current() is None  # the context ended with the block
    await bus.publish(f"{name}.b", b"2", task_id="t43")  # sent in no trace
    got: list[tuple[str | None, dict[str, str], object, dict[str, object]]] = []
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        got.append((d.task_id, d.headers, tracing.current(),
                    structlog.contextvars.get_contextvars()))  # fmt: skip
        if len(got) == 2:
            done.set()

    await _run_until(bus, consumer, handler, done)
    (_, headers, current, ctx), (_, bare, none, bare_ctx) = sorted(got, key=lambda g: g[0] or "")
    # W3C trace context, written and read by OpenTelemetry's propagator
    assert headers[HDR_TRACEPARENT] == tracing.traceparent(sc)
    assert current is not None and (current.trace_id, current.span_id) == (sc.trace_id, sc.span_id)
    assert ctx["task_id"] == "t42" and ctx["trace_id"] == f"{sc.trace_id:032x}"
    assert HDR_TRACEPARENT not in bare and none is None and "trace_id" not in bare_ctx


async def test_a_served_request_runs_in_its_callers_trace_with_its_task_id(bus: Bus) -> None:
    subject = uid("serve.")
    seen: list[tuple[str | None, object, dict[str, object]]] = []

    async def responder(request: Request) -> DocumentsErased:
        seen.append((request.task_id, tracing.current(), structlog.contextvars.get_contextvars()))
        return DocumentsErased(tenant="acme")

    await bus.serve([subject], responder)
    sc = _context()
    with tracing.within(sc):
        await bus._nc.flush()
        reply = await bus.request(subject, b"", DocumentsErased, task_id="t7")
        assert reply == DocumentsErased(tenant="acme")
    [(task_id, current, ctx)] = seen
    assert task_id == "t7" and ctx["task_id"] == "t7"
    assert current is not None and (current.trace_id, current.span_id) == (sc.trace_id, sc.span_id)
    assert ctx["trace_id"] == f"{sc.trace_id:032x}"  # request handlers bind it too


async def test_long_handlers_are_kept_alive_past_ack_wait(bus: Bus) -> None:
    name, consumer = await _work_stream(bus)  # ack_wait 2 s
    calls = 0
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)  # 2.5x ack_wait: in_progress must extend it
        done.set()

    await bus.publish(f"{name}.slow", b"x")
    await _run_until(bus, consumer, handler, done)
    assert calls == 1


async def test_connecting_to_a_dead_port_fails_fast_with_a_clear_error() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable, match="cannot reach NATS"):
        await connect(url, name="t", timeout=1.5)
    assert time.monotonic() - t0 < 5


def test_one_pure_rule_settles_every_outcome() -> None:
    from baton.bus import Nak, Term, settlement

    assert settlement(None, 1, 5).action == "ack"
    assert settlement(Nak(2.0), 1, 5) == settlement(Nak(2.0), 4, 5)
    assert (settlement(Nak(2.0), 1, 5).action, settlement(Nak(2.0), 1, 5).delay) == ("nak", 2.0)
    assert settlement(Nak(2.0), 5, 5).action == "dead_letter"  # the last delivery
    assert settlement(Nak(2.0), 500, -1).action == "nak"  # unlimited: never dead-letters
    assert settlement(Term("poison"), 1, 5).action == "dead_letter"
    assert settlement(Term("answered", dead_letter=False), 1, 5).action == "term"
    from proto import codec  # a body no delivery can read: dead-lettered on the first

    assert settlement(codec.DecodeError("bad"), 1, 5).action == "dead_letter"
    # A peer down (backoff): the nak's delay doubles per delivery, at most 30 s.
    waits = [settlement(Nak(1.0, backoff=True), n, 10).delay for n in (1, 2, 3, 4, 9)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 30.0]
    assert settlement(Nak(1.0, backoff=True), 10, 10).action == "dead_letter"
    backoff = [settlement(ValueError("x"), n, 10).delay for n in (1, 2, 3, 9)]
    assert backoff == [0.5, 1.0, 2.0, 30.0]
    last = settlement(ValueError("boom"), 10, 10)
    assert last.action == "dead_letter" and last.reason == "ValueError: boom"


async def test_publishes_from_consecutive_loop_passes_share_one_socket_write(bus: Bus) -> None:
    """The coalescing flusher: a publish made one loop pass after another
    joins its write (nats-py's own flusher writes them one syscall each),
    and every message still arrives, in order."""
    subject = uid("coalesce")
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)
        if len(got) == 3:
            arrived.set()

    await bus.subscribe_raw(subject, on_msg)
    await bus._nc.flush()
    transport = bus._nc._transport
    assert transport is not None
    writes = 0
    real = transport.writelines

    def counting(lines):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        real(lines)

    transport.writelines = counting  # type: ignore[method-assign]
    try:

        async def later(passes: int, body: bytes) -> None:
            for _ in range(passes):
                await asyncio.sleep(0)
            await bus._nc.publish(subject, body)

        await asyncio.gather(later(0, b"a"), later(1, b"b"), later(2, b"c"))
        await asyncio.wait_for(arrived.wait(), 5)
    finally:
        transport.writelines = real  # type: ignore[method-assign]
    assert got == [b"a", b"b", b"c"]
    assert writes <= 2  # the stock flusher: 3


async def test_conditional_writes_and_lookups_speak_baton_errors(bus: Bus) -> None:
    """What callers act on arrives as the transport's own errors or None,
    never as nats-py's (the services import nothing from it)."""
    name = uid("L")
    await bus.ensure_stream(StreamSpec(name=name, subjects=(f"{name}.>",), retention="limits",
                                       duplicate_window=60))  # fmt: skip
    subject = f"{name}.a"
    first = await bus.publish_if_last(subject, b"one", 0)
    with pytest.raises(WrongLastSequence):
        await bus.publish_if_last(subject, b"again", 0)  # the subject is not empty any more
    second = await bus.publish_if_last(subject, b"two", first)
    assert (await bus.last_msg(name, subject)).data == b"two"  # type: ignore[union-attr]
    assert await bus.last_msg(name, f"{name}.none") is None
    assert await bus.get_msg(name, second + 100) is None
    assert await bus.subjects(name, f"{name}.>") == {subject: 2}
    assert await bus.erase_subject(name, subject) == 2
    assert await bus.get_msg(name, first) is None and await bus.get_msg(name, second) is None


async def test_a_subjects_sequences_are_the_same_found_either_way(bus: Bus) -> None:
    """Erasure finds a subject's messages by direct lookups or, for a known
    count over ``DIRECT_LOOKUPS``, an ephemeral consumer: the same sequences,
    and the consumer is gone afterwards."""
    name = uid("S")
    await bus.ensure_stream(StreamSpec(name=name, subjects=(f"{name}.>",), retention="limits",
                                       duplicate_window=60))  # fmt: skip
    many = DIRECT_LOOKUPS + 4
    for i in range(many):
        await bus.publish(f"{name}.{'a' if i % 2 else 'b'}", b"x")
    counts = await bus.subjects(name, f"{name}.>")
    for subject, count in counts.items():
        direct = await bus.sequences(name, subject)
        assert len(direct) == count and direct == sorted(direct)
        assert await bus.sequences(name, subject, count=count) == direct
        assert await bus.sequences(name, subject, count=many) == direct  # through a consumer
    assert await bus.consumers(name) == []
    assert await bus.erase_subject(name, f"{name}.a", count=many) == counts[f"{name}.a"]
    assert await bus.subjects(name, f"{name}.>") == {f"{name}.b": counts[f"{name}.b"]}


async def test_a_bucket_compare_and_set_loses_with_wrong_last_sequence(bus: Bus) -> None:
    kv = await bus.ensure_bucket(BucketSpec(name=uid("b"), history=4, erasable=True))
    assert kv.erasable and await kv.get("k") is None
    rev = await kv.create("k", b"1")
    with pytest.raises(WrongLastSequence):
        await kv.create("k", b"again")
    newer = await kv.update("k", b"2", last=rev)
    with pytest.raises(WrongLastSequence):
        await kv.update("k", b"3", last=rev)  # stale
    entry = await kv.get("k")
    assert entry is not None and (entry.value, entry.revision) == (b"2", newer)
    assert await kv.get("k", consistent=True) == entry  # the stream leader's answer
    assert await kv.erase_history("k", keep_after=newer) == 1  # the first revision
    assert [e.value for e in await kv.entries()] == [b"2"]


async def test_a_bucket_lists_the_newest_live_entry_of_each_matching_key(bus: Bus) -> None:
    """Listing reads every matching key's newest revision, none deleted, all
    of them however many (a watch-based listing returned none under load)."""
    kv = await bus.ensure_bucket(BucketSpec(name=uid("b"), history=4))
    assert await kv.entries() == []  # empty: answered at once
    for i in range(300):  # more than one fetch of the reader
        await kv.put(f"acme.k{i}", b"old")
        await kv.put(f"acme.k{i}", str(i).encode())
    await kv.put("globex.k0", b"theirs")
    await kv._kv.delete("acme.k7")
    await kv._kv.purge("acme.k8")
    listed = {e.key: e.value for e in await kv.entries("acme.*")}
    assert len(listed) == 298 and "acme.k7" not in listed and "acme.k8" not in listed
    assert listed["acme.k299"] == b"299" and "globex.k0" not in listed
    assert len(await kv.entries("acme.*", limit=10)) == 10
    assert await bus.consumers(kv.spec.stream) == []  # the readers' consumers are gone


async def test_provisioning_waits_for_a_cluster_peer_still_starting() -> None:
    """JetStream answers 10005 "no suitable peers for placement" while a peer
    of an R3 stream is not up yet (seen: a service exiting at the chaos
    cluster's start); provisioning waits like it waits out an election, and
    any other refusal still fails at once."""
    import nats.js.errors

    from baton.bus.config import _retry_store_race

    calls = 0

    async def placement(fail_times: int, code: int) -> str:
        nonlocal calls
        calls += 1
        if calls <= fail_times:
            raise nats.js.errors.APIError(code=400, err_code=code, description="refused")
        return "created"

    assert await _retry_store_race(lambda: placement(3, 10005)) == "created"
    assert calls == 4
    calls = 0
    with pytest.raises(nats.js.errors.APIError):
        await _retry_store_race(lambda: placement(1, 10052))
    assert calls == 1


async def test_provisioning_retries_the_update_after_a_create_that_found_the_stream() -> None:
    """The whole add-or-update step is retried: an update that meets JetStream
    without a leader waits like the create does (a scripted JetStream: the
    timing of an election cannot be provoked on a real one)."""
    import nats.errors
    import nats.js.errors

    calls: list[str] = []

    class Js:
        async def add_stream(self, config: object) -> None:
            calls.append("add")
            raise nats.js.errors.BadRequestError(code=400, err_code=10058, description="in use")

        async def update_stream(self, config: object) -> None:
            calls.append("update")
            if calls.count("update") == 1:
                raise nats.errors.TimeoutError

    bus = Bus(None, js=Js())  # type: ignore[arg-type]
    await bus.ensure_stream(StreamSpec("S", ("s.>",), retention="limits", duplicate_window=60))
    assert calls == ["add", "update", "add", "update"]


async def test_opening_a_bucket_waits_out_jetstream_without_a_leader() -> None:
    """A service opens the tenant registry as it starts: a timeout while the
    cluster elects (seen in the chaos tier: a context store restarted during
    a cluster restart exited 1) is retried; a missing bucket is None at once."""
    import nats.errors
    import nats.js.errors

    calls: list[str] = []

    class Js:
        async def key_value(self, name: str) -> object:
            calls.append(name)
            if name == "missing":
                raise nats.js.errors.NotFoundError
            if len(calls) <= 2:
                raise nats.errors.TimeoutError
            return object()

    bus = Bus(None, js=Js())  # type: ignore[arg-type]
    assert await bus.open_bucket(BucketSpec("registry")) is not None
    assert calls == ["registry"] * 3
    assert await bus.open_bucket(BucketSpec("missing")) is None
    assert calls[3:] == ["missing"]


async def test_stream_names_finds_the_overlapping_streams(bus: Bus) -> None:
    region = uid("R")
    names = sorted(uid("S") for _ in range(3))
    for n in names:
        await bus.ensure_stream(StreamSpec(name=n, subjects=(f"{region}.{n}.>",),
                                           retention="limits", duplicate_window=60))  # fmt: skip
    await bus.ensure_stream(StreamSpec(name=uid("S"), subjects=(f"{uid('other')}.>",),
                                       retention="limits", duplicate_window=60))  # fmt: skip
    assert await bus.stream_names(f"{region}.*.>") == names
    assert await bus.stream_names(f"{uid('none')}.>") == []


async def test_stream_names_pages_under_the_accounts_own_api_prefix() -> None:
    """JetStream names at most 1,024 streams an answer: the rest are asked
    for by offset, on the API subject of the account the bus speaks to (a
    scripted server: 1,025 real streams would make a slow test)."""
    import json
    from types import SimpleNamespace

    every = [f"S{i:04}" for i in range(2100)]
    asked: list[tuple[str, str, int]] = []

    class Nc:
        def jetstream(self, **_: object) -> object:
            return object()

        async def request(self, subject: str, body: bytes, timeout: float) -> SimpleNamespace:
            q = json.loads(body)
            asked.append((subject, q["subject"], q["offset"]))
            page = every[q["offset"] : q["offset"] + 1024]
            answer = {"total": len(every), "offset": q["offset"], "limit": 1024, "streams": page}
            return SimpleNamespace(data=json.dumps(answer).encode())

    tenant = Bus(Nc()).account("$JS.acme.API")  # type: ignore[arg-type]
    assert await tenant.stream_names("x.>") == every
    api = "$JS.acme.API.STREAM.NAMES"
    assert asked == [(api, "x.>", 0), (api, "x.>", 1024), (api, "x.>", 2048)]
