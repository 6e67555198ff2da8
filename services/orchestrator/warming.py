"""The shell of pre-warming (``prewarm.py`` decides): after a transition
dispatched a model step or its tool calls, publish the warm of the step
that follows on the chosen worker's own subject, and tell the router to
send that step there. Best effort: a warm that cannot be published is
logged and forgotten; it never holds up the run.

Counted in ``baton_prewarms_total{outcome}`` (sent, in_flight, no_worker,
pressure). Each run's last warm is remembered (bounded; forgotten when the
run ends) so that a run has one warm in flight at most.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import structlog

from baton.bus import Bus
from proto import subjects

from . import metrics as m
from . import prewarm
from . import transitions as T
from .routing import Router
from .state import RunState

log = structlog.get_logger("orchestrator")

REMEMBER = 100_000  # runs whose last warm is kept (the oldest are forgotten first)


class Warming:
    def __init__(
        self,
        bus: Bus,
        router: Router,
        rules: T.Rules,
        *,
        enabled: bool = True,
        max_load: float = 0.5,
        stale_after: float = 6.0,
    ) -> None:
        self.bus = bus
        self.router = router
        self.rules = rules
        self.enabled = enabled and router.enabled
        self.max_load = max_load
        self.stale_after = stale_after
        self.last: OrderedDict[str, prewarm.LastWarm] = OrderedDict()  # run key -> its last warm

    def _running(self, effects: list[T.Effect]) -> list[str]:
        """The steps a transition set running: dispatched, or waiting for tools."""
        steps = [e.job.step for e in effects if isinstance(e, T.Dispatch | T.DispatchTool)]
        return list(dict.fromkeys(steps))

    async def after(self, run: RunState, effects: list[T.Effect]) -> None:
        if not self.enabled:
            return
        if run.terminal:
            self.last.pop(run.key, None)
            return
        for step in self._running(effects):
            await self._one(run, step)

    async def _one(self, run: RunState, step: str) -> None:
        now = time.time()

        def prefer(pool: str) -> str | None:
            return self.router.choose(run.tenant, run.session, pool)

        out = prewarm.decide(run, self.rules, step, self.router.heartbeats.last, now,
                             last=self.last.get(run.key), prefer=prefer,
                             stale_after=self.stale_after, max_load=self.max_load)  # fmt: skip
        if isinstance(out, str):
            if out in prewarm.COUNTED:
                m.PREWARMS.labels(out).inc()
            return
        try:
            await self.bus.publish(subjects.worker_job(out.pool, out.worker), out.job,
                                   msg_id=out.job.job_id, task_id=run.task_id)  # fmt: skip
        except Exception as exc:
            log.warning("prewarm_not_sent", step=out.job.step, error=repr(exc))
            return
        self.router.warmed(out.job.job_id, out.pool, out.worker)
        self.last[run.key] = prewarm.LastWarm(out.job.step, now)
        self.last.move_to_end(run.key)
        while len(self.last) > REMEMBER:
            self.last.popitem(last=False)
        m.PREWARMS.labels("sent").inc()
        log.info("prewarm_sent", step=out.job.step, pool=out.pool, worker=out.worker)
