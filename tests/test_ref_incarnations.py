"""Refs name the session's incarnation: a session erased and written again
under the same id does not revive the refs issued before the erasure."""

from __future__ import annotations

from baton.bus import Bus
from baton.dev.testing import uid
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextDelete,
    ContextFork,
    ContextRef,
    ContextStats,
)
from services.context_store.refs import RefSigner
from tests.ctx import append, ask, window


def test_the_incarnation_is_signed() -> None:
    signer = RefSigner(b"k" * 32)
    ref = signer.sign("acme", "s1", 3, b"\x01" * 8)
    assert signer.verify(ref)
    moved = ContextRef(ref.tenant, ref.session, ref.version, ref.sig, b"\x02" * 8)
    assert not signer.verify(moved)  # the signature does not carry over to another incarnation
    assert signer.sign("acme", "s1", 3, b"\x02" * 8).sig != ref.sig


async def test_an_erased_and_recreated_session_does_not_revive_old_refs(bus: Bus) -> None:
    tenant, session, kid = uid("acme"), uid("s"), uid("k")
    old = (await append(bus, tenant, session, "m1", "before erasure", system="sys")).ref
    assert old is not None and old.version == 2 and len(old.incarnation) == 8
    forked = (await ask(bus, "fork", ContextFork(tenant=tenant, ref=old, child=kid))).ref
    assert forked is not None
    assert (await window(bus, tenant, old, 4096)).error is None  # the ref works before
    assert (await ask(bus, "delete", ContextDelete(tenant=tenant, session=session))).error is None

    # The same id, written again past the old ref's version: a new incarnation.
    new = (await append(bus, tenant, session, "m1", "after erasure", system="sys")).ref
    assert new is not None and new.version >= old.version and new.incarnation != old.incarnation
    for stale in (old, forked):
        reply = await window(bus, tenant, stale, 4096)
        assert reply.error is not None and reply.error.code == "unknown_session", stale
        assert reply.messages == []
    # An old ref cannot fork the new incarnation either; the new ref reads the new text.
    fork = await ask(bus, "fork", ContextFork(tenant=tenant, ref=old, child=uid("k")))
    assert fork.error is not None and fork.error.code == "unknown_session"
    fresh = await window(bus, tenant, new, 4096)
    assert fresh.error is None and [m.content for m in fresh.messages] == ["sys", "after erasure"]
    # The incarnation is fixed by the first record: later appends keep it.
    later = (await append(bus, tenant, session, "m2", "more")).ref
    assert later is not None and later.incarnation == new.incarnation


async def test_an_answer_to_an_erased_session_does_not_write_it_again(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    ref = (await append(bus, tenant, session, "m1", "question", system="sys")).ref
    assert ref is not None
    answer = [ChatMessage(role="assistant", content="the answer")]
    ok = await ask(bus, "append", ContextAppend(tenant=tenant, session=session, msg_id="a1",
                                                messages=answer, base=ref))  # fmt: skip
    assert ok.error is None and ok.length == 3
    # Erased while a worker generated its next answer: the answer is refused...
    assert (await ask(bus, "delete", ContextDelete(tenant=tenant, session=session))).error is None
    late = await ask(bus, "append", ContextAppend(tenant=tenant, session=session, msg_id="a2",
                                                  messages=answer, base=ok.ref))  # fmt: skip
    assert late.error is not None and late.error.code == "unknown_session"
    # ...and the session stays gone, also once re-created by someone else.
    stats = await ask(bus, "stats", ContextStats(tenant=tenant, session=session))
    assert stats.error is not None and stats.error.code == "unknown_session"
    await append(bus, tenant, session, "m1", "a new conversation")
    again = await ask(bus, "append", ContextAppend(tenant=tenant, session=session, msg_id="a2",
                                                   messages=answer, base=ok.ref))  # fmt: skip
    assert again.error is not None and again.error.code == "unknown_session"
