"""KV-cache-aware admission: how many jobs the worker may hold and run at once,
and which waiting job goes next.

Headroom is counted in KV-cache tokens (prompt + ``max_tokens`` of every admitted
job against the engine's KV-cache capacity times a safety margin) and in sequence
slots (``max_num_seqs``), never as a fixed concurrency. A job larger than the
whole budget (but within the context length) runs alone rather than never.

Jobs fetched beyond what runs wait here (at most ``queue`` of them, so the
choice has something to choose from while the rest stay in the shared
queue for other workers). The next one admitted is fair by work
(``next_waiter``): the waiter whose tenant holds the fewest admitted tokens,
in arrival order within a tenant — so a tenant whose long jobs fill the
worker does not keep another tenant's short job waiting behind its own
queued ones. The head waits for room; nothing passes it (a large job is
never starved by small ones of the same or a busier tenant).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Order = Literal["tokens", "fifo"]


@dataclass(slots=True)
class Waiter:
    tenant: str
    need: int
    arrival: int
    granted: asyncio.Future[None] = field(repr=False, compare=False)


def next_waiter(waiting: Sequence[Waiter], held: Mapping[str, int], order: Order) -> int:
    """Index in ``waiting`` (arrival order) of the job to admit next: under
    ``tokens``, the first waiter of the tenant holding the fewest admitted
    tokens (ties: the earlier arrival); under ``fifo``, the first."""
    if order == "fifo" or len(waiting) < 2:
        return 0
    return min(range(len(waiting)), key=lambda i: (held.get(waiting[i].tenant, 0), i))


class Admission:
    def __init__(
        self,
        kv_tokens: int,
        max_seqs: int,
        headroom: float = 0.9,
        *,
        order: Order = "tokens",
        queue: int = 0,
    ) -> None:
        self.kv_limit = max(1, int(kv_tokens * headroom))
        self.seq_limit = max_seqs
        self.order: Order = order
        self.queue = queue  # jobs fetched beyond what fits, waiting for room
        self.tokens = 0
        self.seqs = 0
        self.held: dict[str, int] = {}  # tenant -> admitted tokens
        self._waiting: list[Waiter] = []
        self._arrivals = itertools.count()
        self._cond = asyncio.Condition()
        self._avg_need = 512.0

    def resize(self, kv_tokens: int, max_seqs: int, headroom: float = 0.9) -> None:
        self.kv_limit = max(1, int(kv_tokens * headroom))
        self.seq_limit = max_seqs
        self._grant()

    def fits(self, need: int) -> bool:
        if self.seqs == 0:
            return True
        return self.seqs < self.seq_limit and self.tokens + need <= self.kv_limit

    def room_for(self, held_waiting: int) -> int:
        """Jobs worth fetching now: free sequence slots, bounded by the KV
        tokens left divided by the average job's need, plus the waiting
        queue's length, minus jobs already fetched and not admitted."""
        slots = self.seq_limit - self.seqs
        by_kv = int((self.kv_limit - self.tokens) / max(1.0, self._avg_need))
        if self.seqs == 0:
            by_kv = max(by_kv, 1)
        return max(0, max(0, min(slots, by_kv)) + self.queue - held_waiting)

    async def acquire(self, need: int, tenant: str = "") -> None:
        """Wait for room for ``need`` tokens, in the fair order."""
        w = Waiter(tenant, need, next(self._arrivals), asyncio.get_running_loop().create_future())
        self._waiting.append(w)
        self._grant()
        try:
            await w.granted
        except asyncio.CancelledError:
            if w in self._waiting:
                self._waiting.remove(w)
                self._grant()  # it may have been the head holding others back
            elif w.granted.done() and not w.granted.cancelled():
                self._take_back(w.tenant, w.need)  # granted as it was cancelled
            raise

    async def release(self, need: int, tenant: str = "") -> None:
        self._take_back(tenant, need)
        async with self._cond:
            self._cond.notify_all()

    def _take_back(self, tenant: str, need: int) -> None:
        self.tokens -= need
        self.seqs -= 1
        left = self.held.get(tenant, 0) - need
        if left > 0:
            self.held[tenant] = left
        else:
            self.held.pop(tenant, None)
        self._grant()

    def _grant(self) -> None:
        """Admit waiters in the fair order while the next one fits."""
        while self._waiting:
            i = next_waiter(self._waiting, self.held, self.order)
            w = self._waiting[i]
            if w.granted.done():  # its wait was cancelled: it leaves the queue
                del self._waiting[i]
                continue
            if not self.fits(w.need):
                return
            del self._waiting[i]
            self.tokens += w.need
            self.seqs += 1
            self.held[w.tenant] = self.held.get(w.tenant, 0) + w.need
            self._avg_need = 0.9 * self._avg_need + 0.1 * w.need
            w.granted.set_result(None)

    async def wait_change(self, timeout: float) -> None:
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait(), timeout)
