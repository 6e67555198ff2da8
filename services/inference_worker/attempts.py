"""Which dispatch of each job this worker has taken, so an older dispatch
that turns up later is skipped.

A step with no answer by its deadline is dispatched again (``attempt`` + 1).
The first dispatch may still be out there: routed to a worker that died, it
waits for a peer to rescue it, and the rescue can come after the retry. Run
then, it would only store a second result for a step already answered. Any
dispatch's answer is the step's (the orchestrator takes the first), so one
older than a dispatch already taken here is acked and dropped. Pure, bounded:
the latest ``REMEMBER`` jobs.
"""

from __future__ import annotations

from collections import OrderedDict

REMEMBER = 4096


class Attempts:
    """job_id -> the highest ``attempt`` of it taken here."""

    def __init__(self, remember: int = REMEMBER) -> None:
        self.remember = remember
        self._latest: OrderedDict[str, int] = OrderedDict()

    def take(self, job_id: str, attempt: int) -> bool:
        """Record that ``attempt`` of ``job_id`` is taken; False (and nothing
        recorded) when a later attempt was taken already."""
        latest = self._latest.get(job_id, 0)
        if attempt < latest:
            return False
        self._latest[job_id] = attempt
        self._latest.move_to_end(job_id)
        while len(self._latest) > self.remember:
            self._latest.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._latest)
