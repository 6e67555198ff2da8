"""Crypto-shredding of run entries: each task's entry in ``baton-runs`` is
sealed with a key of its own (the entry ``<tenant>.<task_id>.key``, written
once; listings of ``<tenant>.*`` do not see it), so erasing a task destroys
one key instead of erasing every revision its steps replaced
(docs/architecture.md, "Streams, consumers, buckets"). Sealing is
``baton.sealing`` (XChaCha20-Poly1305): a random 24-byte nonce per write,
the run's key as associated data, so a sealed entry cannot be passed off as
another task's."""

from __future__ import annotations

from collections import OrderedDict

from baton.bus import Bucket, WrongLastSequence
from baton.sealing import KEY_BYTES, SEALED, is_sealed, new_key, seal, unseal

__all__ = ["KEY_BYTES", "SEALED", "RunKeys", "is_sealed", "key_entry", "new_key", "seal", "unseal"]


def key_entry(run_key: str) -> str:
    """Where a run's key is stored in the bucket."""
    return f"{run_key}.key"


class RunKeys:
    """The runs' keys in the runs bucket, cached (a key never changes until
    it is destroyed)."""

    def __init__(self, bucket: Bucket, *, cached: int = 16_384) -> None:
        self.bucket = bucket
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = cached

    def _remember(self, run_key: str, key: bytes) -> bytes:
        self._cache[run_key] = key
        self._cache.move_to_end(run_key)
        while len(self._cache) > self._cached:
            self._cache.popitem(last=False)
        return key

    async def get(self, run_key: str) -> bytes | None:
        """The run's key (None: never made, or destroyed)."""
        if (key := self._cache.get(run_key)) is not None:
            return key
        entry = await self.bucket.get(key_entry(run_key), consistent=True)
        return self._remember(run_key, entry.value) if entry is not None else None

    def cached(self, run_key: str) -> bytes | None:
        return self._cache.get(run_key)

    async def load(self, tenant: str) -> None:
        """Every key of ``tenant``'s runs, in one listing."""
        for entry in await self.bucket.entries(key_entry(f"{tenant}.*"), limit=1_000_000):
            self._remember(entry.key.removesuffix(".key"), entry.value)

    async def get_or_create(self, run_key: str) -> bytes:
        if (key := await self.get(run_key)) is not None:
            return key
        key = new_key()
        try:
            await self.bucket.create(key_entry(run_key), key)
        except WrongLastSequence:  # another replica made it first
            entry = await self.bucket.get(key_entry(run_key), consistent=True)
            assert entry is not None
            key = entry.value
        return self._remember(run_key, key)

    async def destroy(self, run_key: str) -> int:
        """Overwrite the run's key in the raw store: every sealed revision of
        the run is unreadable from now on. How many key messages were erased."""
        self._cache.pop(run_key, None)
        return await self.bucket.erase_history(key_entry(run_key), keep_after=2**63)
