"""Timing one job or tool call where it runs, for a run's waterfall.

A worker starts a ``Stopwatch`` when it takes the message and calls
``lap(phase)`` at the end of each phase: the time since the previous lap
goes to that phase, so the phases cover the worker's whole part without a
gap or an overlap. ``timing()`` is what the result carries
(``proto.messages.Timing``); the orchestrator adds the result's trip to it
(services/orchestrator/waterfall.py). Epoch seconds throughout (the
timestamps are shown to clients; the durations are their differences).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proto.messages import PHASES, Phases, Timing


class Stopwatch:
    def __init__(self, queued_at: float, clock: Callable[[], float] = time.time) -> None:
        """``queued_at``: when the message was published (by the publisher's
        clock); the queue phase runs from it to now."""
        self._clock = clock
        self.queued_at = queued_at
        self.started_at = self._last = clock()
        self.first_token_at = 0.0
        self._phases = dict.fromkeys(PHASES, 0.0)

    def lap(self, phase: str) -> float:
        """End ``phase`` now (it may be ended again later: it adds up); returns now."""
        now = self._clock()
        self._phases[phase] += now - self._last
        self._last = now
        return now

    def first_token(self) -> float:
        """The first token came: prefill ends."""
        self.first_token_at = self.lap("prefill")
        return self.first_token_at

    def timing(self) -> Timing:
        """The timing so far, finished at the last lap."""
        queued = self.queued_at or self.started_at
        phases = Phases(**{**self._phases, "queue": max(0.0, self.started_at - queued)})
        return Timing(queued_at=queued, started_at=self.started_at,
                      first_token_at=self.first_token_at, finished_at=self._last,
                      phases=phases.rounded())  # fmt: skip
