"""Erasure from the raw JetStream store.

A stream purge only marks messages removed; their bytes can linger in the
file store's blocks until compaction. So each message of a subject is first
deleted through ``STREAM.MSG.DELETE`` without ``no_erase`` — the server then
overwrites the stored bytes — and the subject is purged afterwards to catch
anything written meanwhile.
"""

from __future__ import annotations

from baton.transport import Bus


async def list_subjects(bus: Bus, stream: str, pattern: str) -> dict[str, int]:
    """Subjects of ``stream`` matching ``pattern``, with their message counts.

    (The server pages past 100,000 subjects; one tenant's sessions stay well
    under that, and the retention sweep runs again on its next tick.)"""
    return await bus.subjects(stream, pattern)


async def sequences(bus: Bus, stream: str, subject: str) -> list[int]:
    """Stream sequences of every message on ``subject`` (headers only, no bodies)."""
    seqs = [m.metadata.sequence.stream
            async for m in bus.read_subject(stream, subject, headers_only=True)]  # fmt: skip
    return seqs


async def erase_subject(bus: Bus, stream: str, subject: str) -> int:
    """Overwrite and remove every message on ``subject``; returns how many."""
    erased = await bus.erase_messages(stream, await sequences(bus, stream, subject))
    await bus.purge(stream, subject=subject)
    return erased


async def erase_matching(bus: Bus, stream: str, pattern: str) -> tuple[int, int]:
    """Erase every subject matching ``pattern``; returns (subjects, messages)."""
    found = await list_subjects(bus, stream, pattern)
    erased = 0
    for subject in sorted(found):
        erased += await erase_subject(bus, stream, subject)
    await bus.purge(stream, subject=pattern)
    return len(found), erased
