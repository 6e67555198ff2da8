"""How a step shares its engine under continuous batching, predicted: its
batch, decode speed, GPU-seconds and wait, from the ``ahead`` sequences it
meets on a pool of ``slots`` and the ``behind`` known to follow. Pure (no
clock, no I/O); the formulas: docs/scheduling.md, "The prediction" (sharing,
wait, run, "What GPU-seconds means")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True, slots=True)
class Share:
    batch: int  # full batches that run before the step's own (0: a free slot now)
    concurrency: float  # sequences sharing the engine while the step runs, itself included


def share(slots: int, ahead: float, behind: float) -> Share:
    """The step's batch and the sequences it shares the engine with (per
    engine: ``ahead`` and ``behind`` are per worker of the pool)."""
    slots = max(1, slots)
    batch = int(max(0.0, ahead) // slots)
    total = max(0.0, ahead) + 1.0 + max(0.0, behind)
    return Share(batch, max(1.0, min(float(slots), total - batch * slots)))


@dataclass(frozen=True, slots=True)
class Overlap:
    gpu_seconds: float  # the step's share of engine time over its run
    mean_concurrency: float  # sequences on the engine, itself included, averaged over its run


def overlap(
    start: float,
    run_s: float,
    spans: Sequence[tuple[float, float]],
    *,
    slots: int,
    workers: int = 1,
    company: float = 1.0,
) -> Overlap:
    """A step running from ``start`` for ``run_s`` seconds, sharing its
    engine in time: ``spans`` are when the other sequences whose ends are
    predicted run (seconds from now, ``[begin, end)``, pool-wide: split
    among ``workers``); ``company`` (itself included) the sequences present
    all along whose ends are not known (the steps known to follow it,
    another replica's). At each moment ``n = min(slots, company + known
    spans covering it / workers)``; the step is charged ``dt / n`` (as a
    worker's ``GpuClock`` charges), so a step that outlives the others
    pays the engine alone once they left."""
    slots = max(1, slots)
    workers = max(1, workers)
    end = start + max(0.0, run_s)
    if run_s <= 0:
        return Overlap(0.0, max(1.0, min(float(slots), company)))
    cuts = {start, end}
    for b, e in spans:
        cuts.update(x for x in (b, e) if start < x < end)
    edges = sorted(cuts)
    gpu = weighted = 0.0
    for lo, hi in pairwise(edges):
        mid = (lo + hi) / 2.0
        known = sum(1 for b, e in spans if b <= mid < e)
        n = max(1.0, min(float(slots), company + known / workers))
        gpu += (hi - lo) / n
        weighted += (hi - lo) * n
    return Overlap(gpu, weighted / run_s)


def decode_speed(alone_tps: float, slowdown: float, concurrency: float) -> float:
    """Per-sequence decode speed with ``concurrency`` sequences in the batch."""
    return alone_tps / (1.0 + max(0.0, slowdown) * max(0.0, concurrency - 1.0))


def queue_wait(slots: int, ahead: int, run_s: float, frees_in: Sequence[float] = ()) -> float:
    """Seconds until a slot is free for the step. ``slots``: of the whole
    pool; ``frees_in``: seconds from now until each sequence ahead of the
    step that this replica placed is predicted to end, ascending."""
    slots = max(1, slots)
    if ahead < slots:
        return 0.0
    k = ahead - slots  # the step takes the slot freed by the (k+1)-th end
    if k < len(frees_in):
        return max(0.0, frees_in[k])
    # Ends not known (placed by another replica, or only in the queue's
    # count): the rest drain at the batch rate after the known ones.
    known = max(0.0, frees_in[-1]) if frees_in else 0.0
    return known + (k - len(frees_in) + 1) * run_s / slots


ALONE_BATCH = 1.25
"""Steps whose mean batch (sequences sharing the engine, themselves
included) is at most this ran about alone: their speed is the speed alone."""


class SlowdownFit:
    """Per-sequence decode speed against the sequences sharing the engine,
    fitted from finished steps: ``1 / speed = a + b x (n - 1)``, so a
    sequence alone decodes at ``1 / a`` tokens/s and each other sequence in
    the batch slows it by ``b / a`` of that. Least squares over an
    exponentially decaying window (``weight`` per new step), so the fit
    follows the engine as it is now."""

    def __init__(
        self,
        weight: float = 0.05,
        min_spread: float = 0.5,
        min_steps: int = 4,
        alone: bool = True,
    ) -> None:
        self.weight = weight
        self.min_spread = min_spread  # of n: one batch size alone says nothing of the slope
        self.min_steps = min_steps
        # Before a slope can be told, steps that ran (about) alone tell the
        # speed alone (False: nothing until the slope).
        self.alone = alone
        self.steps = 0
        self._s = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, concurrency: float, decode_tps: float, tokens: float = 1.0) -> None:
        """One finished step: its mean sequences sharing the engine while it
        ran (run time / GPU-seconds charged) and its speed over ``tokens``.
        The step weighs by its tokens when they are given (the prefill fit):
        the speed alone is then total tokens over total seconds, as a long
        prompt runs, not the mean of short prompts' speeds, which a request's
        fixed cost to its first token drags down."""
        if decode_tps <= 0 or not math.isfinite(decode_tps) or not concurrency >= 1.0:
            return
        if not tokens > 0:
            return
        x, y, keep, w = concurrency - 1.0, 1.0 / decode_tps, 1.0 - self.weight, tokens
        self._s = keep * self._s + w
        self._x = keep * self._x + w * x
        self._y = keep * self._y + w * y
        self._xx = keep * self._xx + w * x * x
        self._xy = keep * self._xy + w * x * y
        self.steps += 1

    def estimate(self) -> tuple[float, float] | None:
        """``(alone_tps, slowdown)``, or None until the steps seen spread over
        enough batch sizes to tell a slope — except that steps seen about
        alone (a mean batch within ``ALONE_BATCH`` of one) tell the speed
        alone, with no slowdown known yet."""
        if self.steps == 0:
            return None
        mx, my = self._x / self._s, self._y / self._s
        var = self._xx / self._s - mx * mx
        if self.steps < self.min_steps or var < self.min_spread**2:
            if self.alone and mx <= ALONE_BATCH - 1.0 and my > 0:
                return 1.0 / my, 0.0
            return None
        b = max(0.0, (self._xy / self._s - mx * my) / var)
        a = my - b * mx
        if a <= 0:
            return None
        return 1.0 / a, b / a


class PrefillFit:
    """A prefill's engine time against the prompt tokens it prefills, fitted
    from steps that ran about alone: ``seconds = fixed + per_token x tokens``
    (least squares, exponentially decaying, as ``SlowdownFit``): ``fixed``
    is a request's cost to its first token whatever its prompt, ``per_token``
    the engine's work per prompt token. Alone, a step's time to its first
    token is all its own. It also keeps the prompt tokens a step of the pool
    typically prefills (an exponential average over every step seen) and,
    from the steps seen in a batch, how much of the others' prefills a
    step's first token waits for (``batch_share``: 1 on an engine that runs
    the batch's prefills one after the other, as vLLM on one device does, 0
    on one that runs them side by side, as the simulator does)."""

    def __init__(self, weight: float = 0.05, min_spread: float = 32.0) -> None:
        self.weight = weight
        self.min_spread = min_spread  # tokens: one prompt length alone tells no slope
        self.steps = 0
        self.typical_tokens = 0.0
        self._s = self._x = self._y = self._xx = self._xy = 0.0
        self._bx = self._bxx = 0.0  # the batched steps: others' prefills, against the wait

    def observe(self, concurrency: float, tokens: float, seconds: float) -> None:
        """One finished step: the mean sequences sharing its engine, the
        prompt tokens it prefilled and its time to its first token."""
        if not tokens > 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        keep = 1.0 - self.weight
        if concurrency > ALONE_BATCH:
            got = self.estimate()
            if got is not None and self.typical_tokens > 0:
                fixed, per_token = got
                others = (concurrency - 1.0) * self.typical_tokens * per_token
                waited = seconds - fixed - per_token * tokens
                self._bx = keep * self._bx + others * waited
                self._bxx = keep * self._bxx + others * others
        t = self.typical_tokens
        self.typical_tokens = tokens if t <= 0 else t + 4 * self.weight * (tokens - t)
        if not concurrency <= ALONE_BATCH:
            return
        self._s = keep * self._s + 1.0
        self._x = keep * self._x + tokens
        self._y = keep * self._y + seconds
        self._xx = keep * self._xx + tokens * tokens
        self._xy = keep * self._xy + tokens * seconds
        self.steps += 1

    def estimate(self) -> tuple[float, float] | None:
        """``(fixed_s, per_token_s)``, or None until steps alone spread over
        prompt lengths. Neither is negative: a negative intercept (noise)
        is refitted through the origin."""
        if self.steps < 2:
            return None
        mx, my = self._x / self._s, self._y / self._s
        var = self._xx / self._s - mx * mx
        if var < self.min_spread**2:
            return None
        b = max(0.0, (self._xy / self._s - mx * my) / var)
        a = my - b * mx
        if a < 0:
            return 0.0, self._xy / self._xx
        return a, b

    def batch_share(self) -> float:
        """The part of each other sequence's (typical) prefill a step's first
        token waits for in a batch, 0 to 1; 1 until steps in a batch are seen."""
        if self._bxx <= 0:
            return 1.0
        return min(1.0, max(0.0, self._bx / self._bxx))


JOINED_AFTER_S = 0.25
"""A step placed on a pool where a step placed before it had been running
this long joined a running batch: it arrived during a run, not with it
(the steps of one burst are placed milliseconds apart)."""


def arrival_rate(joins: Sequence[float], now: float, horizon: float = 20.0) -> float:
    """Steps per second joining a pool's running batches, from the times
    (``now``'s clock) the recent ones did: ``(k - 1) / (last - first)``
    over those within ``horizon``, at least three. 0 when fewer joined, or
    when none came for twice the gap seen (the stream of arrivals ended):
    steps arriving in closed waves, each after the last one ended, never
    join, and nothing is expected to follow them."""
    recent = [t for t in joins if 0.0 <= now - t <= horizon]
    if len(recent) < 3:
        return 0.0
    span = recent[-1] - recent[0]
    if span <= 0:
        return 0.0
    rate = (len(recent) - 1) / span
    return 0.0 if now - recent[-1] > 2.0 / rate else rate


def expected_arrivals(
    rate: float, start: float, run_s: float, limit: int
) -> tuple[tuple[float, float], ...]:
    """The steps expected to join a step's engine while it runs (from
    ``start`` for ``run_s``), arriving at ``rate`` per second and each
    running as long as it (one like it): spans as ``overlap`` takes them,
    at most ``limit`` (the pool's slots)."""
    if rate <= 0 or run_s <= 0:
        return ()
    gap = 1.0 / rate
    count = min(limit, int(run_s / gap))
    return tuple((start + k * gap, start + k * gap + run_s) for k in range(1, count + 1))
