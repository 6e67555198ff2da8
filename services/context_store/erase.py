"""Erasure from the raw JetStream store of every subject matching a pattern
(a tenant's sessions, attachments or documents).

``Bus.erase_subject`` overwrites each message of a subject
(``STREAM.MSG.DELETE`` without ``no_erase``) and purges the subject after; the
pattern is purged once more at the end, to catch subjects written meanwhile.
(The server pages past 100,000 subjects; one tenant's sessions stay well
under that, and the retention sweep runs again on its next tick.)
"""

from __future__ import annotations

from baton.bus import Bus


async def erase_matching(bus: Bus, stream: str, pattern: str) -> tuple[int, int]:
    """Erase every subject matching ``pattern``; returns (subjects, messages)."""
    found = await bus.subjects(stream, pattern)
    erased = 0
    for subject, count in sorted(found.items()):
        erased += await bus.erase_subject(stream, subject, count=count)
    await bus.purge(stream, subject=pattern)
    return len(found), erased
