"""The twin's bucket: revisions, compare-and-set, an injectable race."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from baton.bus import Bucket, Entry, WrongLastSequence
from proto.streams import BucketSpec

from .streams import matches


class TwinBucket(Bucket):
    """A bucket in memory: revisions and compare-and-set, as ``Bucket``."""

    def __init__(self, spec: BucketSpec) -> None:  # no nats-py KeyValue behind it
        self.spec = spec
        self.erasable = spec.erasable
        self.revision = 0
        self.history: dict[str, list[Entry]] = {}
        # Called with the key before every create/update/put: a test injects a
        # race there (``race``: another writer stores the key first).
        self.before_write: Callable[[str], None] | None = None
        self.log: list[Entry] = []  # every write, in order (what a shell stored, and when)
        self.conflicts = 0  # writes refused by compare-and-set

    def _newest(self, key: str) -> Entry | None:
        revs = self.history.get(key)
        return revs[-1] if revs else None

    def _store(self, key: str, value: bytes) -> int:
        self.revision += 1
        entry = Entry(key, value, self.revision)
        self.history.setdefault(key, []).append(entry)
        del self.history[key][: -max(1, self.spec.history)]
        self.log.append(entry)
        return self.revision

    def race(self, key: str) -> None:
        """Another writer stores ``key`` again as it is (its revision moves on)."""
        e = self._newest(key)
        if e is not None and not e.deleted:
            self._store(key, e.value)

    def _check(self, key: str, last: int | None) -> None:
        if self.before_write is not None:
            self.before_write(key)
        e = self._newest(key)
        now = 0 if e is None or e.deleted else e.revision
        if last is not None and now != last:
            self.conflicts += 1
            raise WrongLastSequence(f"wrong last sequence: {now} (expected {last})")

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        e = self._newest(key)
        return None if e is None or e.deleted else e

    async def create(self, key: str, value: bytes) -> int:
        self._check(key, 0)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self._check(key, last)
        return self._store(key, value)

    async def put(self, key: str, value: bytes) -> int:
        self._check(key, None)
        return self._store(key, value)

    async def entries(
        self, pattern: str = ">", *, limit: int = 10_000, patient: bool = False
    ) -> list[Entry]:
        newest = [revs[-1] for k, revs in sorted(self.history.items()) if matches(pattern, k)]
        return [e for e in newest if not e.deleted][:limit]

    async def follow(self, *, inactive_threshold: float = 30.0) -> AsyncIterator[Entry]:
        raise NotImplementedError("the bus twin does not simulate bucket watches")
        yield  # pragma: no cover  (an async generator, as Bucket.follow)

    async def erase_history(self, key: str, *, keep_after: int) -> int:
        if not self.erasable:
            return 0
        revs = self.history.get(key, [])
        kept = [e for e in revs if e.revision >= keep_after]
        self.history[key] = kept
        return len(revs) - len(kept)
