"""Attribute engine time to the jobs sharing it.

While ``n`` jobs run at once, each accrues ``dt / n`` seconds: a batch of 32
jobs that runs 2 s costs 2 GPU-seconds in total, not 64.
"""

from __future__ import annotations

import time


class GpuClock:
    def __init__(self) -> None:
        self._active: dict[str, float] = {}
        self._last = time.monotonic()

    def _advance(self) -> None:
        now = time.monotonic()
        if self._active:
            share = (now - self._last) / len(self._active)
            for key in self._active:
                self._active[key] += share
        self._last = now

    def start(self, key: str) -> None:
        self._advance()
        self._active[key] = 0.0

    def stop(self, key: str) -> float:
        """Stop ``key``'s clock; returns its share of engine seconds."""
        self._advance()
        return self._active.pop(key, 0.0)
