"""Refs name the session's incarnation: a session erased and written again
under the same id does not revive the refs issued before the erasure."""

from __future__ import annotations

from baton.bus import Bus
from baton.dev.testing import uid
from proto import subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextDelete,
    ContextFork,
    ContextRef,
    ContextStats,
    StoredAppend,
)
from proto.streams import CONTEXT
from services.context_store.history import Build, HistoryStore
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


class _LostCheck:
    """A bus whose stream leader has just changed and forgotten the
    expected-last-subject-sequence check (nats-server#8469): a conditional
    write is stored whatever the subject holds."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    def __getattr__(self, name: str) -> object:
        return getattr(self._bus, name)

    async def publish_if_last(self, subject: str, payload: bytes, last_seq: int) -> int:
        last = await self._bus.last_msg(CONTEXT.name, subject)
        return await self._bus.publish_if_last(subject, payload, last.seq if last else 0)


def _store(bus: object) -> HistoryStore:
    return HistoryStore(bus)  # type: ignore[arg-type]  # a Bus, or _LostCheck standing in for one


async def test_a_first_record_stored_twice_keeps_the_first_incarnation(bus: Bus) -> None:
    tenant, session = uid("acme"), uid("s")
    # Replica A stores the first record; its reply (and ack) is lost, so the
    # write is retried on replica B after a leader change: stored again.
    first, _, dup = await _store(bus).write(tenant, session, "m1", _build("m1", "hello"))
    assert not dup and len(first.incarnation) == 8
    again, length, dup = await _store(_LostCheck(bus)).write(
        tenant, session, "m1", _build("m1", "hello")
    )
    assert dup and length == 1  # the retry is the record already there, not a second message
    assert again.incarnation == first.incarnation  # refs B signs name what every reader folds
    # Another writer's first record, stored behind the first one: a new message, same incarnation.
    other, length, dup = await _store(_LostCheck(bus)).write(
        tenant, session, "m2", _build("m2", "bye")
    )
    assert not dup and length == 2 and other.incarnation == first.incarnation
    fresh = await _store(bus).load(tenant, session)
    assert fresh.incarnation == first.incarnation
    assert [m.content for m in fresh.messages] == ["hello", "bye"]
    assert len(await bus.sequences(CONTEXT.name, subjects.context_log(tenant, session))) == 3


def _build(msg_id: str, content: str) -> Build:
    return lambda _s: StoredAppend(
        msg_id=msg_id, messages=[ChatMessage(role="user", content=content)]
    )
