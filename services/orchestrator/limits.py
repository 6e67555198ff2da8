"""Per-tenant limits as pure decisions (no I/O, no clock: every call
is given ``now``); what they are and how a refusal looks: docs/reliability.md,
"Fair sharing between tenants", and ``BATON_DEFAULT_LIMITS`` in docs/settings.md.

``max_in_flight`` reads the FIFO task stream: at intake a delivery tells how
many older tasks are unfinished (the active runs, none queued ahead) and how
many wait behind it (``num_pending``). A task is refused when ``max_in_flight``
older tasks were unfinished when it was submitted; every task unfinished now
was then, so no task under the limit is refused (``InFlightCut``). The rate
bucket runs on submission times (stream timestamps), else a backlog drained
at the worker's pace would never look fast. Tenants' fair-dispatch shares are
read here and only here (``Limiter.share``)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

WINDOW = 60.0  # seconds: tokens_per_minute's window
MIN_RETRY = 0.1  # seconds: the smallest retry hint given


class TenantLimits(BaseModel):
    """One tenant's limits (0 = unlimited)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fair dispatch (fairness.py), in the unit BATON_FAIR_POLICY picks. A
    # weight: a tenant with twice the share gets twice the room when every
    # tenant is busy. token_share: tokens its running steps hold on the
    # workers (prompt + max_tokens of each step in flight); share: its tasks
    # running at once (policy "count").
    token_share: int = Field(default=16_384, ge=1)
    share: int = Field(default=32, ge=1)
    max_in_flight: int = Field(default=0, ge=0)
    tasks_per_second: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    # Tasks a tenant may submit at once above its rate (0: one second's worth).
    burst: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a task is refused and when trying again may succeed."""

    limit: str  # "max_in_flight" | "tasks_per_second" | "tokens_per_minute"
    retry_after: float  # seconds
    message: str


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("at", "burst", "level", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.level = self.burst
        self.at = -math.inf

    def _refill(self, now: float) -> float:
        if now <= self.at:  # time never runs backwards for the bucket
            return self.level
        return min(self.burst, self.level + (now - self.at) * self.rate)

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0: now)."""
        level = self._refill(now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate

    def take(self, now: float) -> float:
        """Take a token and return 0, or take nothing and return the wait."""
        wait = self.wait(now)
        if wait == 0.0:
            self.level = self._refill(now) - 1.0
            self.at = max(self.at, now)
        return wait


class TokenWindow:
    """Tokens spent in the last ``WINDOW`` seconds."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW:
            self.total -= self.entries.popleft()[1]

    def spend(self, tokens: int, now: float) -> None:
        self._expire(now)
        if tokens > 0:
            self.entries.append((now, tokens))
            self.total += tokens

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def wait(self, limit: int, now: float) -> float:
        """Seconds until less than ``limit`` is used (0: already)."""
        self._expire(now)
        over = self.total - limit
        if over < 0:
            return 0.0
        for at, tokens in self.entries:  # oldest first
            over -= tokens
            if over < 0:
                return at + WINDOW - now
        return WINDOW  # unreachable: the entries sum to the total


@dataclass(slots=True)
class InFlightCut:
    """From the last delivery seen: tasks with stream sequence in
    ``[cut, tail]`` were submitted while ``max_in_flight`` older ones were
    unfinished."""

    cut: int = 0
    tail: int = -1

    def observe(self, seq: int, pending: int, active: int, limit: int) -> None:
        """A delivery at ``seq`` with ``pending`` newer tasks behind it, while
        ``active`` older ones run. The task at ``seq + k`` has ``active + k``
        older unfinished tasks (every one between is still queued). What an
        earlier view found stays true, so views still ahead of ``seq`` merge."""
        cut, tail = seq + max(0, limit - active), seq + pending
        if self.tail < seq:
            self.cut, self.tail = cut, tail
        elif cut <= self.tail + 1:
            self.cut, self.tail = min(self.cut, cut), max(self.tail, tail)

    def over(self, seq: int) -> bool:
        return self.cut <= seq <= self.tail


class Limiter:
    """Every tenant's counters and the decision for each task."""

    def __init__(self, default: TenantLimits, per_tenant: dict[str, TenantLimits]) -> None:
        self.default = default
        self.per_tenant = dict(per_tenant)
        self._buckets: dict[str, TokenBucket] = {}
        self._windows: dict[str, TokenWindow] = {}
        self._cuts: dict[str, InFlightCut] = {}
        self._run_seconds: dict[str, float] = {}  # moving mean, the in-flight retry hint

    def of(self, tenant: str) -> TenantLimits:
        return self.per_tenant.get(tenant, self.default)

    def share(self, tenant: str, policy: str) -> int:
        """The tenant's fair-dispatch share in ``policy``'s unit."""
        lim = self.of(tenant)
        return lim.token_share if policy == "tokens" else lim.share

    def _bucket(self, tenant: str, lim: TenantLimits) -> TokenBucket:
        b = self._buckets.get(tenant)
        if b is None:
            burst = lim.burst or math.ceil(lim.tasks_per_second)
            b = self._buckets[tenant] = TokenBucket(lim.tasks_per_second, burst)
        return b

    def _window(self, tenant: str) -> TokenWindow:
        return self._windows.setdefault(tenant, TokenWindow())

    def _in_flight_hint(self, tenant: str) -> float:
        return max(MIN_RETRY, round(self._run_seconds.get(tenant, 1.0), 2))

    def check(
        self, tenant: str, *, seq: int, pending: int, active: int, submitted_at: float, now: float
    ) -> Refusal | None:
        """Accept (None, counting the task) or refuse the task at stream
        sequence ``seq`` that reached intake ``now``; ``pending`` newer
        tasks wait behind it, ``active`` of the tenant's tasks run."""
        lim = self.of(tenant)
        if lim.max_in_flight:
            cut = self._cuts.setdefault(tenant, InFlightCut())
            if not cut.over(seq):  # a fresh view unless the last one already covers it
                cut.observe(seq, pending, active, lim.max_in_flight)
            if cut.over(seq):
                return Refusal("max_in_flight", self._in_flight_hint(tenant),
                               f"more than {lim.max_in_flight} tasks in flight")  # fmt: skip
        return self._rates(tenant, lim, submitted_at, now, take=True)

    def peek(self, tenant: str, *, in_flight: int, now: float) -> Refusal | None:
        """Would a task submitted ``now`` be refused? (The HTTP API answers
        429 instead of publishing it.) Counts nothing."""
        lim = self.of(tenant)
        if lim.max_in_flight and in_flight >= lim.max_in_flight:
            return Refusal("max_in_flight", self._in_flight_hint(tenant),
                           f"more than {lim.max_in_flight} tasks in flight")  # fmt: skip
        return self._rates(tenant, lim, now, now, take=False)

    def _rates(
        self, tenant: str, lim: TenantLimits, submitted_at: float, now: float, *, take: bool
    ) -> Refusal | None:
        if lim.tokens_per_minute:
            wait = self._window(tenant).wait(lim.tokens_per_minute, now)
            if wait > 0:
                return Refusal("tokens_per_minute", max(MIN_RETRY, round(wait, 2)),
                               f"over {lim.tokens_per_minute} tokens per minute")  # fmt: skip
        if lim.tasks_per_second:
            bucket = self._bucket(tenant, lim)
            wait = bucket.take(submitted_at) if take else bucket.wait(submitted_at)
            if wait > 0:
                return Refusal("tasks_per_second", max(MIN_RETRY, round(wait, 2)),
                               f"over {lim.tasks_per_second:g} tasks per second")  # fmt: skip
        return None

    def finished(self, tenant: str, *, tokens: int, seconds: float, now: float) -> None:
        """A task of ``tenant`` ended after ``seconds``, having used ``tokens``."""
        self._window(tenant).spend(tokens, now)
        prev = self._run_seconds.get(tenant)
        self._run_seconds[tenant] = seconds if prev is None else 0.8 * prev + 0.2 * seconds
