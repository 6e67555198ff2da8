"""The shell of pre-warming (``prewarm.py`` decides): publish the warm of the
step that follows (or of each branch of a fan-out that follows) on the
chosen worker's own subject, tell the router to send that step there, and
while an input step waits or a model turn's tool calls are out re-send a
warm (``keep``; docs/scheduling.md, "Kept warm across a wait"). Best
effort: a warm that cannot be published is logged and forgotten. Each run's
last warm is remembered (bounded; forgotten when the run ends): one warm in
flight at most (a fan-out's warms count as one)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from baton.bus import Bus
from proto import subjects
from proto.messages import Step

from . import metrics as m
from . import prewarm
from . import transitions as T
from .routing import Router
from .runs import RunStore
from .state import RunState

log = structlog.get_logger("orchestrator")

REMEMBER = 100_000  # runs whose last warm is kept (the oldest are forgotten first)


@dataclass(slots=True)
class Kept:
    """A wait kept warm: an input step (its follower is kept warm) or a
    model step whose tool calls are out (its own prefix is); the run as the
    wait began (a refresh reads it afresh)."""

    run: RunState
    step: str  # the input step, or the model step waiting for its tools
    pool: str
    worker: str
    sent: float
    refreshes: int = 0
    status: str = "waiting_input"  # the step's status while it waits; "tools"
    turn: int = 0  # "tools": the turn whose calls are out


class Warming:
    def __init__(
        self,
        bus: Bus,
        router: Router,
        rules: T.Rules,
        runs: RunStore,
        *,
        enabled: bool = True,
        max_load: float = 0.5,
        stale_after: float = 6.0,
    ) -> None:
        """``runs``: where a refresh reads the run as stored now (another
        replica may have taken the answer)."""
        self.bus = bus
        self.router = router
        self.rules = rules
        self.runs = runs
        self.enabled = enabled and router.enabled
        self.max_load = max_load
        self.stale_after = stale_after
        self.last: OrderedDict[str, prewarm.LastWarm] = OrderedDict()  # run key -> its last warm
        self.kept: OrderedDict[str, Kept] = OrderedDict()  # run key -> its input wait kept warm

    def _running(self, effects: list[T.Effect]) -> list[str]:
        """The steps a transition set running: dispatched, waiting for tools,
        or (an input step) waiting for a human."""
        steps = [e.job.step for e in effects if isinstance(e, T.Dispatch | T.DispatchTool)]
        steps += [e.event.step for e in effects if isinstance(e, T.Emit)
                  and isinstance(e.event, Step) and e.event.status == "waiting_input"]  # fmt: skip
        return list(dict.fromkeys(steps))

    async def after(self, run: RunState, effects: list[T.Effect]) -> None:
        if not self.enabled:
            return
        kept = self.kept.get(run.key)
        if kept is not None and (run.terminal or not _waits(run, kept)):
            del self.kept[run.key]
        if run.terminal:
            self.last.pop(run.key, None)
            return
        for step in self._running(effects):
            await self._one(run, step)

    async def _one(self, run: RunState, step: str) -> None:
        now = time.time()

        def prefer(pool: str) -> str | None:
            return self.router.choose(run.tenant, run.session, pool)

        hbs, last = self.router.heartbeats.last, self.last.get(run.key)
        out = prewarm.decide(run, self.rules, step, hbs, now, last=last, prefer=prefer,
                             stale_after=self.stale_after, max_load=self.max_load)  # fmt: skip
        if out == "no_next":  # a fan-out may follow: each branch warmed once (not kept)
            fan = prewarm.branches(run, self.rules, step, hbs, now, last=last,
                                   prefer=prefer, stale_after=self.stale_after,
                                   max_load=self.max_load)  # fmt: skip
            for each in fan if isinstance(fan, list) else [fan]:
                await self._send(run, each, now, "sent")
        st = run.steps[step]
        if await self._send(run, out, now, "sent") and st.input:
            assert isinstance(out, prewarm.Warm)
            self._keep(run, Kept(run, step, out.pool, out.worker, now))
        elif st.status == "tools" and st.worker:  # its prefix was just computed there
            self._keep(run, Kept(run, step, st.pool, st.worker, now, status="tools", turn=st.turn))

    def _keep(self, run: RunState, kept: Kept) -> None:
        self.kept[run.key] = kept
        self.kept.move_to_end(run.key)
        while len(self.kept) > REMEMBER:
            self.kept.popitem(last=False)

    async def _send(self, run: RunState, out: prewarm.Warm | prewarm.Skip, now: float,
                    outcome: str, *, own: bool = False) -> bool:  # fmt: skip
        """``own``: a step's own prefix kept warm (its route and the run's
        last warm of a step to come are left as they are)."""
        if isinstance(out, str):
            if out in prewarm.COUNTED:
                m.PREWARMS.labels(out).inc()
            return False
        try:
            await self.bus.publish(subjects.worker_job(out.pool, out.worker), out.job,
                                   msg_id=out.msg_id, task_id=run.task_id)  # fmt: skip
        except Exception as exc:
            log.warning("prewarm_not_sent", step=out.job.step, error=repr(exc))
            return False
        m.PREWARMS.labels(outcome).inc()
        log.info(
            "prewarm_sent", step=out.job.step, pool=out.pool, worker=out.worker, outcome=outcome
        )
        if own:
            return True
        self.router.warmed(out.job.job_id, out.pool, out.worker)
        self.last[run.key] = prewarm.LastWarm(out.job.step, now)
        self.last.move_to_end(run.key)
        while len(self.last) > REMEMBER:
            self.last.popitem(last=False)
        return True

    async def refresh(self, every: float, now: float | None = None) -> int:
        """One pass over the waits kept warm: each whose last warm is
        ``every`` seconds old is sent again (to the same worker, if it is
        still ready and not under pressure). How many were sent."""
        now = time.time() if now is None else now
        sent = 0
        for key, kept in list(self.kept.items()):
            if now - kept.sent < every:
                continue
            run = await self.runs.get(kept.run.tenant, kept.run.task_id)
            st = run.steps.get(kept.step) if run is not None else None
            # Answered (here or on another replica), timed out, or gone: stop.
            if run is None or st is None or not _waits(run, kept) or st.deadline <= now:
                del self.kept[key]
                continue
            hbs, n = self.router.heartbeats.last, kept.refreshes + 1
            if kept.status == "tools":
                out = prewarm.own(run, self.rules, kept.step, hbs, now, refresh=n,
                                  stale_after=self.stale_after, max_load=self.max_load)  # fmt: skip
            else:
                same = {kept.pool: kept.worker}
                out = prewarm.decide(run, self.rules, kept.step, hbs, now, prefer=same.get,
                                     stale_after=self.stale_after, max_load=self.max_load,
                                     refresh=n)  # fmt: skip
            kept.sent = now  # tried: the next try is a period away, sent or not
            if isinstance(out, prewarm.Warm) and out.worker != kept.worker:
                out = "no_worker"  # its worker is gone: the prefix went with it
            if await self._send(run, out, now, "kept", own=kept.status == "tools"):
                kept.refreshes += 1
                sent += 1
        return sent

    async def keep(self, every: float) -> None:
        """Refresh the waits kept warm, for as long as the orchestrator runs."""
        if not self.enabled or every <= 0:
            return
        while True:
            await asyncio.sleep(min(every, 5.0) / 2)
            try:
                await self.refresh(every)
            except Exception as exc:  # best effort, as every warm
                log.warning("prewarm_keep_failed", error=repr(exc))


def _waits(run: RunState, kept: Kept) -> bool:
    """Whether ``kept``'s step still waits as it did when it was kept."""
    st = run.steps.get(kept.step)
    return st is not None and st.status == kept.status and st.turn == kept.turn
