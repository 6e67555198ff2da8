"""Task intake: one pull loop per tenant's task stream, each fetching only
while its tenant has room under the fair-dispatch share (``fairness.py``:
tokens its runs hold, or tasks; the share other tenants leave idle lent out
as far as the pools hold it), and the tenant limits (``limits.py``) applied
to each task before it starts.

A loop with no room fetches nothing and waits for one of the tenant's runs
to end; the tasks stay in the tenant's stream (durable, in order), so a
flood is drained at the pace its share allows while every other tenant's
intake keeps pulling. The loop is ``Bus.consume`` with the tenant's room as
its gate: ack / nak / term by outcome, kept alive while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from baton.bus import Bus, Consumption, Delivery
from proto.errors import ErrorCode
from proto.messages import TaskSubmit
from proto.streams import ConsumerSpec
from proto.submission import RateLimited, TaskRejected

from .conductor import Conductor
from .fairness import ALONE, FairGate, Policy, PoolRoom, Replicas, estimate_tokens, run_load
from .limits import Limiter
from .state import RunState
from .transitions import in_flight, waiting_step

INPUTS_KEEP = 65_536  # input sizes noted for runs not started yet (bounded)

log = structlog.get_logger("orchestrator")

FETCH_IDLE = 1.0  # seconds: a shut gate looks again this often
RECONCILE_EVERY = 2.0  # seconds between looks at runs held for long
RECONCILE_AFTER = 5.0  # seconds a run is held before it is looked up


class TenantRoom:
    """What each tenant may start: the fair gate, the limiter and the
    tenants the operator suspended, kept in step by the conductor (built
    with it): ``check`` before a task starts, ``changed`` after every run
    change it stores."""

    def __init__(
        self,
        limiter: Limiter,
        policy: Policy = "tokens",
        pool: Callable[[], PoolRoom] | None = None,
        replicas: Callable[[], Replicas] = lambda: ALONE,
    ) -> None:
        """``pool``: what the pools hold now, to lend idle shares out (None:
        no lending); ``replicas``: the replicas lending out of them."""
        self.limiter = limiter
        # Lending idle shares out, bounded by what the pools hold now.
        self.gate = FairGate(lambda t: limiter.share(t, policy), policy, pool, replicas)
        # A run's input, in tokens, from its task message: the prompt of its
        # first step (the run state keeps no input).
        self._inputs: dict[tuple[str, str], int] = {}
        self.suspended: set[str] = set()  # tenants the operator suspended (the registry)

    def check(self, d: Delivery, task: TaskSubmit) -> None:
        """Refuse a task over its tenant's limits (``TaskRejected`` with code
        ``rate_limited``); a redelivery was judged on its first delivery."""
        if task.task_id is not None:
            self._inputs[(task.tenant, task.task_id)] = estimate_tokens(task.input)
            while len(self._inputs) > INPUTS_KEEP:
                del self._inputs[next(iter(self._inputs))]
        if d.num_delivered > 1:
            return
        if task.tenant in self.suspended:
            raise TaskRejected(ErrorCode.TENANT_SUSPENDED, f"tenant {task.tenant!r} is suspended",
                               tenant=task.tenant, task_id=task.task_id,
                               session=task.session)  # fmt: skip
        refusal = self.limiter.check(
            task.tenant,
            seq=d.stream_seq,
            pending=d.pending,
            active=self.gate.older(task.tenant, d.stream_seq),
            submitted_at=d.published_at,
            now=time.time(),
        )
        if refusal is not None:
            assert task.task_id is not None and task.session is not None
            raise RateLimited(
                f"{refusal.message}; retry in {refusal.retry_after:g} s with a new task_id",
                tenant=task.tenant,
                task_id=task.task_id,
                session=task.session,
                retry_after=refusal.retry_after,
            )

    def changed(self, run: RunState) -> None:
        """A stored change of a run: one that ended frees its slot (and
        counts its tokens); one only waiting for a human's input lends its
        slot out until it works again."""
        if run.terminal:  # stored once: nothing changes a finished run again
            now = time.time()
            self._inputs.pop((run.tenant, run.task_id), None)
            self.gate.finish(run.tenant, run.task_id)
            self.limiter.finished(run.tenant, tokens=run.usage.total_tokens,
                                  seconds=max(0.0, now - run.created_at), now=now)  # fmt: skip
        elif waiting_step(run) is not None and not in_flight(run):
            self.gate.park(run.tenant, run.task_id)
        else:
            self.gate.unpark(run.tenant, run.task_id, time.time())
        if not run.terminal:
            self.gate.load(run.tenant, run.task_id, self._load(run))

    def _load(self, run: RunState) -> int:
        """``run_load`` of a stored run: its history is at least its input
        and the longest step so far (that step's prompt and answer)."""
        history = max((s.usage.total_tokens for s in run.steps.values()), default=0)
        history = max(history, self._inputs.get((run.tenant, run.task_id), 0))
        steps = [
            (s.context_budget, s.max_tokens)
            for s in run.steps.values()
            if s.status in ("dispatched", "tools")
        ]
        return run_load(steps, history)


class Intake:
    """The tenants' pull loops: the conductor's task handler, gated by the
    room each tenant has (the ``TenantRoom`` the conductor was built with)."""

    def __init__(self, bus: Bus, conductor: Conductor, room: TenantRoom) -> None:
        self.bus = bus
        self.conductor = conductor
        self.runs = conductor.runs
        self.room = room
        self.limiter, self.gate, self.suspended = room.limiter, room.gate, room.suspended

    # -- the loops -----------------------------------------------------------

    async def _handle(self, tenant: str, d: Delivery) -> None:
        seq, started = d.stream_seq, None
        try:
            run = await self.conductor.on_task(d)
            if run.terminal:  # e.g. stopped for its budget before a step ran
                self.gate.forget(tenant, run.task_id)
            else:
                started = run.task_id
        finally:
            if started is None:
                self.gate.release(tenant, seq)
            else:
                self.gate.adopt(tenant, seq, started, time.time())

    def run_tenant(self, spec: ConsumerSpec, tenant: str, *, concurrency: int) -> Consumption:
        """Pull ``tenant``'s tasks until the bus or the handle stops;
        in-flight handlers finish before the loop ends."""
        return self.bus.consume(
            spec, lambda d: self._handle(tenant, d), concurrency=concurrency,
            gate=_TenantGate(self.gate, tenant),
        )  # fmt: skip

    async def reconcile(self) -> None:
        """Free the slots of runs another replica finished (or an erasure
        tombstoned): each run held longer than ``RECONCILE_AFTER`` is looked
        up every so often."""
        while not self.bus.stopping:
            await asyncio.sleep(RECONCILE_EVERY)
            for tenant, task_id in self.gate.stale(time.time(), RECONCILE_AFTER):
                try:
                    run = await self.runs.get(tenant, task_id)
                except Exception as exc:  # NATS restarting: look again later
                    log.warning("intake_reconcile_failed", error=repr(exc))
                    break
                if run is None or run.terminal:
                    self.gate.finish(tenant, task_id)


class _TenantGate:
    """One tenant's room under the fair gate, as ``Bus.consume`` asks for it."""

    def __init__(self, gate: FairGate, tenant: str) -> None:
        self.gate, self.tenant = gate, tenant
        self.changed = asyncio.Event()
        gate.on_room(tenant, self.changed.set)

    def room(self) -> int:
        return self.gate.room(self.tenant)

    async def wait(self) -> None:
        self.changed.clear()  # then look again: a run may have ended meanwhile
        if self.room() <= 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), FETCH_IDLE)

    def took(self, delivery: Delivery) -> None:
        self.gate.reserve(self.tenant, delivery.stream_seq)
