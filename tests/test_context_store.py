"""The context store against a real nats-server and a real store process:
idempotent appends, refs that cannot be forged or borrowed, budgeted and
byte-identical windows, summaries, forks, and the error codes of bad input."""

from __future__ import annotations

from typing import Any

from baton.bus import Bus
from baton.dev.testing import uid
from proto import codec, subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextAttach,
    ContextDelete,
    ContextFork,
    ContextGet,
    ContextInvalidate,
    ContextRef,
    ContextStats,
    ContextSummarize,
    WindowReply,
)
from proto.sizes import MAX_ATTACHMENT_BYTES, MAX_CONTEXT_MESSAGE_BYTES
from services.context_store.counting import estimate_tokens
from tests.ctx import append, ask, conversation, window


async def test_an_append_repeated_with_the_same_msg_id_is_stored_once(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    one = await append(bus, tenant, session, "m1", "hello", system="sys")
    two = await append(bus, tenant, session, "m1", "hello", system="sys")
    assert (one.length, one.duplicate) == (2, False)
    assert (two.length, two.duplicate) == (2, True) and two.ref == one.ref
    stats = await ask(bus, "stats", ContextStats(tenant=tenant, session=session))
    assert (stats.records, stats.messages) == (1, 2)
    raw = await bus._js.stream_info(
        "BATON_CONTEXT", subjects_filter=subjects.context_log(tenant, session)
    )
    assert raw.state.subjects == {subjects.context_log(tenant, session): 1}


async def test_forged_altered_and_other_tenant_refs_are_refused(bus: Bus) -> None:
    tenant, other = uid("acme"), uid("evil")
    ref = await conversation(bus, tenant, uid("s"), 2)
    assert ref is not None and (await window(bus, tenant, ref, 4096)).error is None
    flipped = bytearray(ref.sig)
    flipped[0] ^= 0x01
    cases = {
        "forged": ContextRef(tenant, ref.session, ref.version, bytes(16)),
        "one byte of the signature": ContextRef(tenant, ref.session, ref.version, bytes(flipped)),
        "a longer version": ContextRef(tenant, ref.session, ref.version + 1, ref.sig),
        "another session": ContextRef(tenant, uid("s"), ref.version, ref.sig),
    }
    for why, bad in cases.items():
        reply = await window(bus, tenant, bad, 4096)
        assert reply.error is not None and reply.error.code == "bad_ref", why
        assert reply.messages == [], why
    # A genuine ref of tenant A presented by tenant B, on B's subject.
    stolen = await window(bus, other, ref, 4096)
    assert stolen.error is not None and stolen.error.code == "forbidden" and not stolen.messages
    # The body says A but the subject says B.
    raw = await bus._nc.request(
        subjects.context_api("window", other),
        codec.encode({"tenant": tenant, "ref": ref, "budget_tokens": 4096}),
    )
    assert codec.decode(raw.data, WindowReply).error.code == "forbidden"  # type: ignore[union-attr]
    # Forking needs a genuine ref too.
    fork = await ask(bus, "fork", ContextFork(tenant=tenant, ref=cases["forged"], child=uid("c")))
    assert fork.error.code == "bad_ref"


async def test_a_window_never_exceeds_its_budget_and_always_keeps_the_system_prompt(
    bus: Bus,
) -> None:
    tenant = uid("acme")
    ref = await conversation(bus, tenant, uid("s"), 40, size=300)
    for budget in (120, 200, 333, 500, 1000, 2500, 4096, 100_000):
        w = await window(bus, tenant, ref, budget)
        assert w.error is None, (budget, w.error)
        assert w.tokens <= budget
        assert sum(estimate_tokens(m) for m in w.messages) == w.tokens <= budget
        assert w.messages[0] == ChatMessage(role="system", content="be brief")
        assert w.messages[-1].content.startswith("a39 ")  # the newest turn
        if w.dropped:
            assert w.messages[1].content == f"[{w.dropped} earlier messages omitted]"
        assert len(w.messages) - 1 - (1 if w.dropped else 0) + w.dropped == ref.version - 1


async def test_the_same_history_renders_byte_identically_even_from_a_cold_cache(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = await conversation(bus, tenant, session, 30)
    first = codec.encode((await window(bus, tenant, ref, 2048)).messages)
    again = codec.encode((await window(bus, tenant, ref, 2048)).messages)
    await bus.notify(subjects.context_invalidate(tenant), ContextInvalidate(tenant=tenant))
    await bus._nc.flush()
    cold = codec.encode((await window(bus, tenant, ref, 2048)).messages)
    assert first == again == cold


async def test_summary_tail_replaces_the_older_turns_with_the_stored_summary(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    await conversation(bus, tenant, session, 10)  # 21 messages
    s = await ask(bus, "summarize", ContextSummarize(
        tenant=tenant, session=session, msg_id="sum1", covers=15, content="they said hi a lot"))  # fmt: skip
    assert s.error is None and s.length == 21
    w = await window(bus, tenant, s.ref, 100_000, strategy="summary_tail")
    assert w.error is None and w.summarized == 14 and w.dropped == 0
    assert w.messages[0].content == "be brief"
    assert w.messages[1].content == "[summary of 14 earlier messages]\nthey said hi a lot"
    assert [m.content[:3] for m in w.messages[2:]] == ["q7 ", "a7 ", "q8 ", "a8 ", "q9 ", "a9 "]
    plain = await window(bus, tenant, s.ref, 100_000)
    assert len(plain.messages) == 21 and plain.summarized == 0
    tight = await window(bus, tenant, s.ref, 200, strategy="summary_tail")
    assert tight.tokens <= 200 and tight.messages[-1].content.startswith("a9 ")


async def test_a_fork_shares_its_parents_prefix_without_copying_it(bus: Bus) -> None:
    tenant, parent = uid("acme"), uid("sup")
    ref = await conversation(bus, tenant, parent, 3)  # 7 messages
    kids, refs = [uid("w"), uid("w")], []
    for kid in kids:
        f = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=kid))
        assert f.error is None and f.ref.session == kid and f.ref.version == 7
        again = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=kid))
        assert again.duplicate and again.ref == f.ref
        refs.append(f.ref)
        await append(bus, tenant, kid, "own", f"only in {kid}")
    await append(bus, tenant, parent, "later", "parent moves on")
    for kid in kids:
        w = await window(
            bus,
            tenant,
            (await ask(bus, "get", ContextGet(tenant=tenant, session=kid))).ref,
            100_000,
        )
        assert [m.content for m in w.messages][-2:] == ["a2 " + "y" * 200, f"only in {kid}"]
        assert len(w.messages) == 8 and "parent moves on" not in str(w.messages)
        raw = await bus._js.stream_info(
            "BATON_CONTEXT", subjects_filter=subjects.context_log(tenant, kid)
        )
        assert raw.state.subjects == {subjects.context_log(tenant, kid): 2}  # fork record + own
        stored = [await bus._js.get_msg("BATON_CONTEXT", seq) for seq in
                  await bus.sequences("BATON_CONTEXT", subjects.context_log(tenant, kid))]  # fmt: skip
        assert sum(len(m.data or b"") for m in stored) < 200  # the shared ~1.5 KB is not copied
    taken = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=parent))
    assert taken.error.code == "bad_request"
    clash = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=kids[0][:-1] + "Z"))
    assert clash.error is None  # a fresh name is fine
    dup = await ask(bus, "fork", ContextFork(tenant=tenant, ref=refs[0], child=kids[1]))
    assert dup.error.code == "conflict"  # kids[1] exists with another origin


async def test_a_new_session_and_a_new_fork_are_written_without_reading_them_first(
    bus: Bus,
) -> None:
    """The fast path: the store reads a session it has never seen only when
    its conditional write says the session exists. Reads go through an
    ephemeral consumer, so count the consumers created on BATON_CONTEXT."""
    created: list[str] = []

    async def tap(msg: Any) -> None:
        if "BATON_CONTEXT" in msg.subject and b"BATON_CONTEXT_ATT" not in msg.subject.encode():
            created.append(msg.subject)

    sub = await bus._nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=tap)
    await bus._nc.flush()
    tenant, parent, other = uid("acme"), uid("sup"), uid("s")
    ref = (await append(bus, tenant, parent, "in", "the task", system="sys")).ref
    f = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=uid("w")))
    assert f.error is None and f.ref.version == 2
    await bus._nc.flush()
    assert created == []
    # A fork onto a session that exists (written by another replica, say) is
    # still refused, and deleting the parent leaves that session alone.
    await append(bus, tenant, other, "mine", "not a fork")
    clash = await ask(bus, "fork", ContextFork(tenant=tenant, ref=ref, child=other))
    assert clash.error.code == "conflict"
    await ask(bus, "delete", ContextDelete(tenant=tenant, session=parent))
    kept = await ask(bus, "get", ContextGet(tenant=tenant, session=other))
    assert [m.content for m in kept.messages] == ["not a fork"]
    await sub.unsubscribe()


async def test_bad_input_gets_specific_error_codes(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = (await append(bus, tenant, session, "m1", "x" * 2000, system="s" * 400)).ref
    assert ref is not None
    cases = [
        ("window", await window(bus, tenant, ref, 50), "budget_too_small"),
        ("window", await window(bus, tenant, ref, 4096, strategy="nope"), "bad_request"),
        ("append", await ask(bus, "append", ContextAppend(tenant=tenant, session=session, msg_id="big",
          messages=[ChatMessage(role="user", content="x" * (MAX_CONTEXT_MESSAGE_BYTES + 1))])), "message_too_large"),
        ("append", await ask(bus, "append", ContextAppend(tenant=tenant, session=session, msg_id="e",
          messages=[])), "bad_request"),
        ("get", await ask(bus, "get", ContextGet(tenant=tenant, session=uid("nope"))), "unknown_session"),
        ("get", await ask(bus, "get", ContextGet(tenant=tenant, session=session, attachment="x")), "unknown_attachment"),
        ("attach", await ask(bus, "attach", ContextAttach(tenant=tenant, session=session, name="big",
          data=b"x" * (MAX_ATTACHMENT_BYTES + 1))), "attachment_too_large"),
        ("attach", await ask(bus, "attach", ContextAttach(tenant=tenant, session=uid("nope"), name="a",
          data=b"x")), "unknown_session"),
        ("summarize", await ask(bus, "summarize", ContextSummarize(tenant=tenant, session=session,
          msg_id="s", covers=99, content="x")), "bad_request"),
    ]  # fmt: skip
    for op, reply, code in cases:
        assert reply.error is not None and reply.error.code == code, (op, code, reply.error)
        assert reply.error.layer == "context"
    garbage = await bus._nc.request(subjects.context_api("window", tenant), b"\xc1 not msgpack")
    assert codec.decode(garbage.data, WindowReply).error.code == "bad_request"  # type: ignore[union-attr]
    missing = await bus._nc.request(
        subjects.context_api("append", tenant), codec.encode({"tenant": tenant})
    )
    assert codec.decode(missing.data, WindowReply).error.code == "bad_request"  # type: ignore[union-attr]
    ok = await ask(
        bus, "attach", ContextAttach(tenant=tenant, session=session, name="a", data=b"1")
    )
    twice = await ask(
        bus, "attach", ContextAttach(tenant=tenant, session=session, name="a", data=b"2")
    )
    assert ok.error is None and twice.error.code == "conflict"
