"""A bucket through the bus: reads, compare-and-set writes, watches,
and erasure of replaced revisions from the raw store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.js.errors
from nats.js.kv import KeyValue

from proto.streams import BucketSpec

from .config import _retry_store_race
from .errors import _translated

if TYPE_CHECKING:
    from .streams import StreamReads


def _deleted(headers: Mapping[str, str]) -> bool:
    """A delete or purge marker (``KV-Operation``; a server-placed TTL or
    purge marker says ``Nats-Marker-Reason``)."""
    return bool(headers.get("KV-Operation") or headers.get("Nats-Marker-Reason"))


@dataclass(frozen=True, slots=True)
class Entry:
    """One bucket entry as stored: ``deleted`` for a delete or purge marker."""

    key: str
    value: bytes
    revision: int
    deleted: bool = False


class Bucket:
    """A bucket through the transport: reads, compare-and-set writes,
    watches, and (``erasable``) erasure of replaced revisions from the raw store."""

    def __init__(self, bus: StreamReads, kv: KeyValue, spec: BucketSpec, *, erasable: bool) -> None:
        self._bus = bus
        self._kv = kv
        # Direct gets (the bucket allows them) are answered by any replica,
        # and a follower may not have the newest revision yet; ``consistent``
        # reads ask the stream's leader.
        self._leader = KeyValue(
            name=spec.name, stream=spec.stream, pre=spec.subject(""), js=bus._js, direct=False
        )
        self.spec = spec
        self.erasable = erasable

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        """The newest entry of ``key`` (None: no such key, or deleted);
        ``consistent``: the leader's answer, not a possibly lagging follower's."""
        try:
            e = await (self._leader if consistent else self._kv).get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if e.value is None or e.revision is None:
            return None
        return Entry(key, e.value, e.revision)

    async def create(self, key: str, value: bytes) -> int:
        """Store ``key`` if it does not exist; its revision.

        Raises:
            WrongLastSequence: the key exists.
        """
        with _translated():
            return int(await self._kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Store ``key`` if its newest revision is still ``last``; the new revision.

        Raises:
            WrongLastSequence: someone wrote first (read again and retry).
        """
        with _translated():
            return int(await self._kv.update(key, value, last=last))

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._kv.put(key, value))

    async def entries(
        self, pattern: str = ">", *, limit: int = 10_000, patient: bool = False
    ) -> list[Entry]:
        """The newest entry of every key matching ``pattern`` (at most
        ``limit``; no deleted ones), read through a pull consumer. (nats-py's
        watch says "all delivered" from a pending count taken while messages
        may already be on their way: under load a listing came back empty.)
        ``patient``: a read a service starts with, so JetStream briefly
        without a leader is waited out as opening the bucket is; a request's
        read fails at once instead."""
        if patient:
            listed: list[Entry] = await _retry_store_race(
                lambda: self.entries(pattern, limit=limit)
            )
            return listed
        out: list[Entry] = []
        prefix = len(self.spec.subject(""))
        reads = self._bus.read_subject(
            self.spec.stream, self.spec.subject(pattern), last_per_subject=True
        )
        async with contextlib.aclosing(reads):
            async for msg in reads:
                if _deleted(msg.headers):
                    continue
                out.append(Entry(msg.subject[prefix:], msg.data, msg.seq))
                if len(out) >= limit:
                    break
        return out

    async def follow(self, *, inactive_threshold: float = 30.0) -> AsyncIterator[Entry]:
        """Every key's newest entry, then each change as it is stored.
        ``inactive_threshold``: how long the server keeps the watch's consumer
        once its client is gone (nats-py's default is 5 min: a killed
        replica's would pile up); one the server dropped is recreated on
        missed heartbeats."""
        watcher = await self._kv.watchall(inactive_threshold=inactive_threshold)
        try:
            async for e in watcher:
                if e is None:  # the initial values are all delivered
                    continue
                yield Entry(e.key, e.value or b"", e.revision or 0, e.operation is not None)
        finally:
            await watcher.stop()

    async def erase_history(self, key: str, *, keep_after: int) -> int:
        """Overwrite every revision of ``key`` before ``keep_after``; how many."""
        if not self.erasable:
            return 0
        return await self._bus.erase_subject(
            self.spec.stream, self.spec.subject(key), keep_after=keep_after
        )
