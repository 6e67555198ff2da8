"""Fair dispatch between tenants: a tenant's runs hold at most its ``share``
of work at once — counted in tokens (``policy="tokens"``, the default) or in
tasks (``"count"``, the older rule); the rest wait in the tenant's own task
stream.

Why tokens: a count lets a tenant of long research runs hold as many slots
as one of short chats, each slot many times the KV cache and the engine's
time; the pool fills with the long runs and everyone else's jobs queue
behind them. A run's work is what its steps in flight hold on a worker —
their prompt plus the tokens they may generate (``run_load``) — so a tenant
with a share of 16,384 tokens runs ~70 chats of 230 tokens at once, or 8
long tasks of 2,000, never a pool's worth of the latter.

Every tenant has its own stream and intake loop (``intake.py``), and the
shared job queue (``BATON_JOBS``) is FIFO. Without a cap, a tenant that
submits 2,000 tasks has 2,000 jobs queued ahead of another tenant's one; with
it, that job waits behind at most the busy tenants' shares. Intake pulls a
tenant's stream only while the tenant has room, so the pulls interleave
across tenants in proportion to their shares (a weighted round-robin driven
by completions), and nothing is refused or lost: a waiting task is simply
not fetched yet.

The gate is bookkeeping only (no I/O, no clock): a slot is *reserved* for a
delivery before it is fetched, becomes an *active* run once the task
started, and is freed when the run ends — told by the conductor on this
replica, or found by the intake's periodic look at runs another replica
finished (``stale``). A run waiting for a human's answer (an ``input`` step,
nothing in flight) is *parked*: it holds no slot until it works again.
A tenant's intake registers a waker (``on_room``), called when its room
grows; the gate itself knows no event loop (a decision module: no asyncio).

Lending (``lend``, policy ``tokens``): a share alone would cap a tenant that
has the cluster to itself. The share the other tenants leave idle (each
one's ``share - held``) is lent to a tenant that wants more, as far as the
pools hold it (``allowance``: their KV cache and sequence slots, from the
workers' heartbeats, less what the others hold). The loan ends by itself:
when a lender takes work, its own room is its full share, and the borrower's
allowance shrinks by what the lender holds, so the borrower fetches nothing
new until its runs have ended down to it; nothing running is stopped.

Several replicas (``replicas.py``): each one's gate sees only its own runs,
so each would lend the whole pool and N replicas fill it N times over. A
replica's part of the pool is what it held at its last load beacon plus
``1/N`` of what every replica's runs leave free (``Replicas``): replicas
that start lending at once fill the pool between them, not N times, and a
replica whose peers hold nothing grows to all of it, beacon by beacon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Policy = Literal["tokens", "count"]

EARLY_KEEP = 4096  # runs that ended before their intake adopted them
FIRST_RUN_TOKENS = 2048  # a tenant's typical run before any was seen (a common max_model_len)
TYPICAL_WEIGHT = 0.2  # moving mean of a tenant's run loads: the newest one's weight


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` as the context store counts without a tokenizer:
    ~4 bytes a token, plus 4 for the message."""
    return len(text.encode()) // 4 + 4


def run_load(steps: Iterable[tuple[int, int]], history: int) -> int:
    """Tokens a run holds on the pool now: for each step in flight,
    ``(context_budget, max_tokens)``, its prompt — its context budget when the
    task set one, else the run's ``history`` so far (input and answers) — plus
    what it may generate. A run with nothing in flight holds nothing."""
    return sum((budget or history) + max_tokens for budget, max_tokens in steps)


def token_room(share: int, held: float, typical: float, *, idle: bool) -> int:
    """Deliveries a tenant's intake may fetch under a token share: what is
    left of ``share`` once ``held`` is counted, in runs of ``typical`` tokens.
    A tenant with nothing running may always start one run, however large (it
    runs alone rather than never)."""
    free = share - held
    n = 0 if free <= 0 else math.floor(free / max(1.0, typical))
    return max(n, 1) if idle else n


@dataclass(frozen=True, slots=True)
class PoolRoom:
    """What the pools hold at once, summed over their live workers: KV cache
    tokens (after the workers' headroom) and sequence slots. Zero: not known
    (no worker heard from), and nothing is lent."""

    kv_tokens: int = 0
    seqs: int = 0


@dataclass(frozen=True, slots=True)
class Replicas:
    """The orchestrator replicas lending out of the same pools: ``count``
    live ones (this one included), the tokens the others' runs hold
    (``elsewhere``) and this one's as it last told them (``here``: the
    same moment's figure as theirs, so its part does not grow with each
    run it takes before the others hear of it)."""

    count: int = 1
    elsewhere: float = 0.0
    here: float = 0.0


ALONE = Replicas()


def allowance(share: int, others: Iterable[tuple[int, float]], pool: PoolRoom,
              typical: float, replicas: Replicas = ALONE) -> float:  # fmt: skip
    """Tokens a tenant may hold, lending included: its ``share``, plus the
    idle part of each other tenant's — ``others`` as ``(share, held)`` on
    this replica —, as far as this replica's part of the pool holds it once
    the others' work is counted. The pool: its KV-cache tokens, and its sequence
    slots filled with the tenant's ``typical`` runs (a pool of 64 slots runs
    64 chats however much KV cache is free; more would queue in the shared job
    queue, ahead of any other tenant's job). This replica's part: what it
    held plus ``1/count`` of what all the ``replicas`` leave free (alone:
    all of it). Never less than ``share``: a tenant's own share is never
    lent away from it."""
    others = list(others)
    idle = sum(max(0.0, s - h) for s, h in others)
    held = sum(h for _, h in others)
    pool_tokens = min(pool.kv_tokens, pool.seqs * max(1.0, typical))
    free = pool_tokens - replicas.elsewhere - replicas.here
    part = replicas.here + free / max(1, replicas.count)
    return max(float(share), min(share + idle, part - held))


class FairGate:
    """``share_of(tenant)``: the tenant's share in the policy's unit (tokens
    or tasks); ``pool()``: what the pools hold now, when idle shares are
    lent (``None``: no lending, each tenant capped at its share);
    ``replicas()``: the replicas lending out of the same pools."""

    def __init__(
        self,
        share_of: Callable[[str], int],
        policy: Policy = "count",
        pool: Callable[[], PoolRoom] | None = None,
        replicas: Callable[[], Replicas] = lambda: ALONE,
    ) -> None:
        self.share_of = share_of
        self.policy = policy
        self.pool = pool if policy == "tokens" else None
        self.replicas = replicas
        self._load: dict[str, dict[str, int]] = {}  # tenant -> task_id -> tokens held (run_load)
        self._typical: dict[str, float] = {}  # tenant -> moving mean of its runs' loads
        self._active: dict[str, dict[str, float]] = {}  # tenant -> task_id -> since
        self._reserved: dict[str, set[int]] = {}  # tenant -> stream seqs being handled
        self._early: dict[tuple[str, str], None] = {}  # ended before adopted
        self._parked: dict[str, set[str]] = {}  # tenant -> runs waiting for input
        self._wakers: dict[str, Callable[[], None]] = {}

    # -- reading ---------------------------------------------------------

    def room(self, tenant: str) -> int:
        """Deliveries the tenant's intake may fetch now."""
        active = self._active.get(tenant, {})
        reserved = self._reserved.get(tenant, ())
        if self.policy == "count":
            return self.share_of(tenant) - len(active) - len(reserved)
        typical = self.typical(tenant)
        return token_room(
            self.limit(tenant), self.held(tenant), typical, idle=not active and not reserved
        )

    def limit(self, tenant: str) -> int:
        """Tokens the tenant may hold now: its share, or with lending its
        ``allowance`` against the other tenants this gate serves."""
        share = self.share_of(tenant)
        if self.pool is None:
            return share
        others = [(self.share_of(t), self.held(t)) for t in self.tenants() if t != tenant]
        return math.floor(
            allowance(share, others, self.pool(), self.typical(tenant), self.replicas())
        )

    def tenants(self) -> set[str]:
        """The tenants this gate knows: served (a waker) or holding work."""
        return set(self._wakers) | set(self._active) | {t for t, r in self._reserved.items() if r}

    def held(self, tenant: str) -> float:
        """Tokens the tenant's runs hold (policy ``tokens``): each active run's
        load, and a typical run's for each delivery being handled and each
        run whose load is not known yet (resumed from another replica)."""
        loads, typical = self._load.get(tenant, {}), self.typical(tenant)
        active = self._active.get(tenant, {})
        return sum(loads.get(t, typical) for t in active) + typical * len(
            self._reserved.get(tenant, ())
        )

    def holding(self) -> float:
        """Tokens all the tenants' runs on this replica hold (its load beacon)."""
        return sum(self.held(t) for t in self.tenants())

    def typical(self, tenant: str) -> float:
        return self._typical.get(tenant, FIRST_RUN_TOKENS)

    def load(self, tenant: str, task_id: str, tokens: int) -> None:
        """Run ``task_id`` holds ``tokens`` now (``run_load`` of its stored
        state); a run that holds less than before wakes its tenant's intake."""
        loads = self._load.setdefault(tenant, {})
        before = loads.get(task_id)
        loads[task_id] = tokens
        if tokens > 0:
            prev = self._typical.get(tenant)
            self._typical[tenant] = (
                tokens if prev is None else (1 - TYPICAL_WEIGHT) * prev + TYPICAL_WEIGHT * tokens
            )
        if before is not None and tokens < before:
            self._wake(tenant)

    def active(self, tenant: str) -> int:
        return len(self._active.get(tenant, ()))

    def older(self, tenant: str, seq: int) -> int:
        """The tenant's unfinished tasks older than stream sequence ``seq``
        that this replica holds: active runs and deliveries ahead of it."""
        return self.active(tenant) + sum(1 for s in self._reserved.get(tenant, ()) if s < seq)

    def stale(self, now: float, older_than: float) -> list[tuple[str, str]]:
        """Active runs adopted more than ``older_than`` seconds ago (to look
        up: another replica may have finished them); each is then timed
        from ``now`` again."""
        out = []
        for tenant, runs in self._active.items():
            for task_id, since in runs.items():
                if now - since > older_than:
                    out.append((tenant, task_id))
                    runs[task_id] = now
        return out

    def on_room(self, tenant: str, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever the tenant's room grows (its intake's event)."""
        self._wakers[tenant] = wake

    # -- the slot's life ---------------------------------------------------

    def reserve(self, tenant: str, seq: int) -> None:
        self._reserved.setdefault(tenant, set()).add(seq)

    def adopt(self, tenant: str, seq: int, task_id: str, now: float) -> None:
        """The delivery at ``seq`` started (or resumed) run ``task_id``."""
        self._reserved.get(tenant, set()).discard(seq)
        if self._early.pop((tenant, task_id), 0) is None:  # it already ended
            self._wake(tenant)
            return
        self._active.setdefault(tenant, {}).setdefault(task_id, now)

    def release(self, tenant: str, seq: int) -> None:
        """The delivery at ``seq`` started no run (refused, a duplicate of a
        finished one, or to be redelivered)."""
        self._reserved.get(tenant, set()).discard(seq)
        self._wake(tenant)

    def forget(self, tenant: str, task_id: str) -> None:
        """Run ``task_id`` ended while its own delivery was handled (``finish``
        found it not adopted yet): the delivery is released, not adopted, so
        nothing else would take the note ``finish`` left."""
        self._early.pop((tenant, task_id), None)
        self._drop_load(tenant, task_id)

    def finish(self, tenant: str, task_id: str) -> None:
        """Run ``task_id`` ended (here or on another replica)."""
        self._drop_load(tenant, task_id)
        runs = self._active.get(tenant)
        if runs is not None and runs.pop(task_id, None) is not None:
            self._wake(tenant)
            return
        parked = self._parked.get(tenant)
        if parked is not None and task_id in parked:
            parked.discard(task_id)
            return
        if self._reserved.get(tenant):  # its intake may not have adopted it yet
            self._early[(tenant, task_id)] = None
            while len(self._early) > EARLY_KEEP:
                del self._early[next(iter(self._early))]

    def park(self, tenant: str, task_id: str) -> None:
        """Run ``task_id`` waits for a human (an ``input`` step): its slot is
        free until it works again; a tenant's waiting runs do not stop its
        intake."""
        runs = self._active.get(tenant)
        if runs is not None and runs.pop(task_id, None) is not None:
            self._parked.setdefault(tenant, set()).add(task_id)
            self._wake(tenant)

    def unpark(self, tenant: str, task_id: str, now: float) -> None:
        """A parked run works again: it holds a slot (the tenant may be over
        its share for a while; intake then waits)."""
        parked = self._parked.get(tenant)
        if parked is not None and task_id in parked:
            parked.discard(task_id)
            self._active.setdefault(tenant, {})[task_id] = now

    def _drop_load(self, tenant: str, task_id: str) -> None:
        loads = self._load.get(tenant)
        if loads is not None:
            loads.pop(task_id, None)

    def _wake(self, tenant: str) -> None:
        """The tenant's room grew; with lending every other tenant's may have
        too (what it held is idle share again)."""
        wakers = self._wakers.values() if self.pool is not None else [self._wakers.get(tenant)]
        for wake in list(wakers):
            if wake is not None:
                wake()
