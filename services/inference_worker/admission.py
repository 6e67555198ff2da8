"""KV-aware admission: how many jobs the worker may hold and run at once.

Headroom is counted in KV tokens (prompt + ``max_tokens`` of every admitted
job against the engine's KV capacity times a safety margin) and in sequence
slots (``max_num_seqs``), never as a fixed concurrency. A job larger than the
whole budget (but within the context length) runs alone rather than never.
"""

from __future__ import annotations

import asyncio
import contextlib


class Admission:
    def __init__(self, kv_tokens: int, max_seqs: int, headroom: float = 0.9) -> None:
        self.kv_limit = max(1, int(kv_tokens * headroom))
        self.seq_limit = max_seqs
        self.tokens = 0
        self.seqs = 0
        self._cond = asyncio.Condition()
        self._avg_need = 512.0

    def resize(self, kv_tokens: int, max_seqs: int, headroom: float = 0.9) -> None:
        self.kv_limit = max(1, int(kv_tokens * headroom))
        self.seq_limit = max_seqs

    def fits(self, need: int) -> bool:
        if self.seqs == 0:
            return True
        return self.seqs < self.seq_limit and self.tokens + need <= self.kv_limit

    def room_for(self, held_waiting: int) -> int:
        """Jobs worth fetching now: free sequence slots, bounded by the KV
        tokens left divided by the average job's need, minus jobs already
        fetched and waiting for admission."""
        slots = self.seq_limit - self.seqs
        by_kv = int((self.kv_limit - self.tokens) / max(1.0, self._avg_need))
        if self.seqs == 0:
            by_kv = max(by_kv, 1)
        return max(0, min(slots, by_kv) - held_waiting)

    async def acquire(self, need: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.fits(need))
            self.tokens += need
            self.seqs += 1
            self._avg_need = 0.9 * self._avg_need + 0.1 * need

    async def release(self, need: int) -> None:
        async with self._cond:
            self.tokens -= need
            self.seqs -= 1
            self._cond.notify_all()

    async def wait_change(self, timeout: float) -> None:
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait(), timeout)
