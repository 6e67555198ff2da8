"""How long an agent answers, learnt from its finished steps.

Pure (no clock, no I/O): ``AnswerLengths`` keeps, per key (a workflow's
agent), the ``completion_tokens`` of its last ``window`` answered steps and
answers an upper quantile of them. The scheduler predicts a step's run time,
GPU-seconds and cost from it (``StepNeed.expected_output``) instead of the
worst case ``max_tokens``; the KV cache a step reserves and every fit stay on
``max_tokens`` (an answer longer than expected costs time, never an OOM).

Conservative: ``None`` (the caller predicts ``max_tokens``) until
``min_seen`` answers are known, and the caller caps the figure at the
step's ``max_tokens``. Memory is bounded: ``window`` lengths per key and at
most ``max_keys`` keys (the least recently answered is forgotten). Kept in
each orchestrator replica's memory, not shared: a replica learns from the
steps it sees finish (every replica sees every run's changes it stores), a
restart starts conservative again. docs/scheduling.md, "Answer lengths".
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

Key = tuple[str, str]  # (workflow, agent)


class AnswerLengths:
    def __init__(
        self,
        *,
        quantile: float = 0.8,
        min_seen: int = 1,
        window: int = 64,
        max_keys: int = 4096,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], not {quantile}")
        if min_seen < 1 or window < min_seen or max_keys < 1:
            raise ValueError("need 1 <= min_seen <= window and max_keys >= 1")
        self.quantile = quantile
        self.min_seen = min_seen
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[Key, deque[int]] = OrderedDict()
        self._cache: dict[Key, int] = {}

    def observe(self, key: Key, completion_tokens: int) -> None:
        """A step of ``key`` answered with this many tokens."""
        if completion_tokens <= 0:
            return  # an aborted or failed generation says nothing of the length
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = deque(maxlen=self.window)
            while len(self._seen) > self.max_keys:
                old, _ = self._seen.popitem(last=False)
                self._cache.pop(old, None)
        else:
            self._seen.move_to_end(key)
        seen.append(completion_tokens)
        self._cache.pop(key, None)

    def expect(self, key: Key) -> int | None:
        """The answer length to predict with (the ``quantile`` of the last
        answers, nearest rank), or None while fewer than ``min_seen`` are known."""
        seen = self._seen.get(key)
        if seen is None or len(seen) < self.min_seen:
            return None
        got = self._cache.get(key)
        if got is None:
            ordered = sorted(seen)
            got = ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)]
            self._cache[key] = got
        return got

    def seen(self, key: Key) -> int:
        s = self._seen.get(key)
        return 0 if s is None else len(s)


def expected_output(learnt: int | None, max_tokens: int) -> int:
    """What a step with this cap is expected to generate: the learnt length,
    never above the cap (nor below one token); the cap when nothing is learnt."""
    if learnt is None:
        return max_tokens
    return max(1, min(learnt, max_tokens))
