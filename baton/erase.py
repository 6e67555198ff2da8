"""Erasing messages from a JetStream stream's raw store.

A purge, an ack on a work queue, or a revision replaced under a KV history
limit only unlink a message: its bytes stay in the block file until the
server compacts the block (never, for the last one). ``STREAM.MSG.DELETE``
without ``no_erase`` overwrites them. So erasure deletes message by message
and purges the subject afterwards to catch anything written meanwhile.

Every function takes a JetStream context, not a ``Bus``, so one eraser
serves Baton's own streams and, through a context made with a JetStream API
prefix (``nc.jetstream(prefix="$JS.<tenant>.API")``), a tenant account's
copy of a stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import nats.js.errors
from nats.js import JetStreamContext


async def sequences(js: JetStreamContext, stream: str, subject: str) -> list[int]:
    """Stream sequences of every message on ``subject`` (one direct lookup
    each: for the few messages a task or a key holds; bulk reads go through
    an ephemeral consumer, ``Bus.read_subject``)."""
    found: list[int] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return found
        assert msg.seq is not None
        found.append(msg.seq)
        seq = msg.seq + 1


async def erase_messages(js: JetStreamContext, stream: str, seqs: Iterable[int]) -> int:
    """Overwrite and remove the messages ``seqs``; returns how many were there."""
    erased = 0
    for seq in seqs:
        try:
            await js.delete_msg(stream, seq)
            erased += 1
        except nats.js.errors.APIError as exc:
            if not _gone(exc):
                raise
    return erased


_SEQUENCE_NOT_FOUND = 10043
_DELETE_FAILED = 10057


def _gone(exc: nats.js.errors.APIError) -> bool:
    """The message is not there (erased meanwhile by another replica, or
    acked). A delete says so three ways: a 404, a 400 'sequence N not found'
    (10043), or a 500 'no message found' (10057, which also means 'not
    permitted': that one still raises)."""
    if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _SEQUENCE_NOT_FOUND:
        return True
    return exc.err_code == _DELETE_FAILED and "no message found" in (exc.description or "")


async def erase_subject(
    js: JetStreamContext, stream: str, subject: str, *, keep_after: int | None = None
) -> int:
    """Overwrite and remove every message on ``subject``, or with
    ``keep_after`` only those before that sequence (and no purge); returns
    how many were erased."""
    seqs = await sequences(js, stream, subject)
    if keep_after is not None:
        return await erase_messages(js, stream, [s for s in seqs if s < keep_after])
    erased = await erase_messages(js, stream, seqs)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.purge_stream(stream, subject=subject)
    return erased
