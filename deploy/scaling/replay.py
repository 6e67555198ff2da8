"""A simulator: the day's tasks replayed, closed-loop, against GPU pools.

Discrete events in continuous time. What it models:

* **Tasks.** A task's phases run in order (plan, 1-3 fan-out rounds,
  synthesis): a phase's jobs are released, each after its ``offset``, when
  the phase before it has finished. Task latency = the synthesis' finish -
  the plan's release.
* **Pool choice.** At release, the orchestrator predicts the step on every
  pool of the scenario and chooses with the real ``predict`` and ``choose``
  of ``services/orchestrator/scheduling.py`` (no copy), from what the pools'
  heartbeats and backlog would say at that moment (``PoolNow``). A step that
  fits no pool fails at once.
* **Workers.** A ready worker runs up to ``max_seqs`` sequences whose KV
  (prompt + ``max_tokens``) fits its ``kv_tokens``; jobs wait FIFO in their
  pool's queue (a worker looks up to ``LOOKAHEAD`` jobs past one it cannot
  hold). A sequence takes prefill (uncached prompt / ``prefill_tps``) +
  decode (output / ``decode_tps``): per-sequence speeds that do not fall
  with the batch (the lag threshold keeps batches where that holds).
  Time to first token = queue wait + the prefill. Jobs of one phase on one
  worker share their prefix (vLLM's prefix cache): a sibling starting while
  another runs prefills only the rest.
* **Scaling.** Scaled pools follow KEDA (``keda.py``); a new worker holds
  its GPU from creation and takes jobs after the pool's ``cold_start_s``; a
  removed one finishes its jobs, then frees the GPU. Always-on pools keep a
  fixed count. GPU-seconds = GPU-holding time; cost = that x the price.
* **Pre-warming** (what only the orchestrator knows, from the workflow
  graph): when a task's plan starts, every later step of the task and the
  pool ``choose`` picks for it now are known, so the orchestrator publishes
  them as expected demand per pool (the largest phase it will send there);
  KEDA scales on the larger of the stream's lag and that demand (a second
  trigger; ``Scenario.announce`` False leaves it out), so a pool at zero
  wakes before the steps arrive. And when a phase starts, the next phase's
  prefix (``prefix`` tokens: its system prompt and the session so far) is
  prefilled on the worker with the most free KV of the pool it will go to,
  held in KV until its steps start there
  (they are routed to it) and given up first when a real step needs the
  room; the step then tells ``predict`` those tokens are cached. The trace's
  sizes of later steps are used as the orchestrator's estimate: an upper
  bound on what estimating them from the window would give.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.scaling.keda import Autoscaler, Policy
from services.orchestrator.pools import PoolSpec
from services.orchestrator.scheduling import Decision, PoolNow, StepNeed, choose, predict

TRACE = Path(__file__).with_name("trace.json")  # written by bursty_trace.py
DRAIN_LIMIT = 7200  # seconds past the horizon before leftover jobs count as unserved
LOOKAHEAD = 16
HEADROOM = 0.9  # admission holds this share of the KV cache (inference_worker/admission.py)


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    task: int
    kind: str
    phase: int
    at: float  # open-loop arrival (the trace's clock; only the plan's is used)
    offset: float  # after its phase is released
    prompt: int
    prefix: int  # known before the phase starts: what pre-warming can prefill
    max_tokens: int
    expected: int  # the output the scheduler expects
    output: int  # the output it produces
    kv: int = field(init=False)  # what admission reserves: prompt + max_tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv", self.prompt + self.max_tokens)

    def need(self, cached: int = 0) -> StepNeed:
        return StepNeed(self.prompt, self.max_tokens, self.expected, cached_tokens=cached)


def load_trace(path: Path = TRACE) -> tuple[list[Job], int]:
    doc = json.loads(path.read_text())
    cols = doc["columns"]
    jobs = [Job(i, **dict(zip(cols, row, strict=True))) for i, row in enumerate(doc["jobs"])]
    return jobs, doc["horizon_s"]


def kv_limit(spec: PoolSpec) -> int:
    return int(spec.kv_tokens * HEADROOM)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Pool:
    """One pool of a scenario: ``policy`` None keeps ``always_on`` workers."""

    spec: PoolSpec
    policy: Policy | None = None
    always_on: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    pools: tuple[Pool, ...]  # the agents' order of preference
    targets_s: dict[str, float]  # per kind: what a step is measured against
    spill: bool = True  # choose with the target (else: the cheapest that fits)
    prewarm: bool = False
    announce: bool = True  # with prewarm: publish the foreseen steps as demand per pool


@dataclass
class Worker:
    started: float
    ready_at: float
    running: dict[int, int] = field(default_factory=dict)  # job id -> KV tokens
    phases: Counter[tuple[int, int]] = field(default_factory=Counter)  # running (task, phase)
    warm: dict[tuple[int, int], int] = field(default_factory=dict)  # pre-warmed prefixes
    kv_running: int = 0
    kv_warm: int = 0
    leaving: bool = False
    freed: bool = False

    def kv_free(self, spec: PoolSpec, keep: tuple[int, int] | None = None) -> int:
        mine = self.warm.get(keep, 0) if keep else 0  # a step's own prefix is its KV already
        return kv_limit(spec) - self.kv_running - self.kv_warm + mine

    def holds(self, key: tuple[int, int]) -> bool:
        return key in self.warm or self.phases[key] > 0

    def add_warm(self, key: tuple[int, int], tokens: int) -> None:
        self.drop_warm(key)
        self.warm[key] = tokens
        self.kv_warm += tokens

    def drop_warm(self, key: tuple[int, int]) -> None:
        self.kv_warm -= self.warm.pop(key, 0)


class PoolRun:
    def __init__(self, pool: Pool) -> None:
        self.spec = pool.spec
        self.policy = pool.policy
        self.scaler = Autoscaler(pool.policy) if pool.policy else None
        self.workers = [Worker(0.0, 0.0) for _ in range(pool.always_on)]
        self.queue: list[Job] = []
        self.expected: dict[int, int] = {}  # task -> steps announced (pre-warming)
        self.lags: deque[tuple[int, int]] = deque()  # (time, lag) as KEDA polled it
        self.pending_warm: list[tuple[tuple[int, int], int]] = []
        self.gpu_seconds = 0.0
        self.timeline: list[int] = []
        self.peak = len(self.workers)
        self.woken_by_demand = 0  # from zero by announced steps alone (pre-warming)

    def ready(self, now: float) -> list[Worker]:
        return [w for w in self.workers if not w.leaving and w.ready_at <= now]

    def now(self, now: float) -> PoolNow:
        ready = self.ready(now)
        starting = [w for w in self.workers if not w.leaving and w.ready_at > now]
        return PoolNow(
            ready=len(ready),
            starting=len(starting),
            running=sum(len(w.running) for w in ready),
            backlog=len(self.queue),
            ready_in_s=min((w.ready_at - now for w in starting), default=None),
        )

    def free(self, w: Worker, now: float) -> None:
        w.freed = True
        self.gpu_seconds += now - w.started
        self.workers.remove(w)


@dataclass
class Step:
    """What happened to one job."""

    pool: str | None = None
    reason: str = ""
    released: float = math.nan
    started: float = math.nan
    finished: float = math.nan
    ttft: float = math.nan
    cold: bool = False  # its pool had no ready worker when it was released
    predicted_s: float = math.nan  # the chosen pool's predicted wait + run
    prefill_saved_s: float = 0.0  # by a cached prefix
    prewarmed: bool = False  # the cached prefix was a pre-warm's (not a sibling's)


@dataclass
class Replayed:
    scenario: Scenario
    jobs: list[Job]
    steps: list[Step]
    pools: dict[str, PoolRun]
    task_latency: dict[int, float]  # completed tasks
    failed_tasks: set[int]
    end: float
    horizon: int


class Replay:
    """One scenario over one trace; ``run()`` once."""

    def __init__(self, jobs: list[Job], horizon: int, scenario: Scenario) -> None:
        self.jobs, self.horizon, self.sc = jobs, horizon, scenario
        self.pools = {p.spec.name: PoolRun(p) for p in scenario.pools}
        self.steps = [Step() for _ in jobs]
        self.phases: dict[int, list[list[Job]]] = {}
        for j in jobs:
            phases = self.phases.setdefault(j.task, [])
            phases.extend([] for _ in range(j.phase + 1 - len(phases)))
            phases[j.phase].append(j)
        self.left = {(t, p): len(js) for t, ps in self.phases.items() for p, js in enumerate(ps)}
        self.unstarted = dict(self.left)
        self.task_latency: dict[int, float] = {}
        self.failed: set[int] = set()
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        intervals = {p.policy.polling_interval for p in scenario.pools if p.policy}
        if len(intervals) > 1:
            raise ValueError("pools of one scenario must share KEDA's polling interval")
        self.poll_every = intervals.pop() if intervals else 10

    # -- events ---------------------------------------------------------------

    def push(self, t: float, handler: Callable[..., None], *args: Any) -> None:
        """Call ``handler(t, *args)`` at ``t`` (ties in the order pushed)."""
        heapq.heappush(self.events, (t, self.seq, handler, args))
        self.seq += 1

    def run(self) -> Replayed:
        for phases in self.phases.values():
            (plan,) = phases[0]
            self.push(plan.at, self.on_release, plan)
        self.push(0, self.on_poll)
        t = 0.0
        while self.events:
            t, _, handler, args = heapq.heappop(self.events)
            handler(t, *args)
        t = max(t, float(self.horizon))  # the day is paid for to its end
        for pool in self.pools.values():
            for w in list(pool.workers):
                pool.free(w, t)
        return Replayed(
            self.sc,
            self.jobs,
            self.steps,
            self.pools,
            self.task_latency,
            self.failed,
            t,
            self.horizon,
        )

    def outstanding(self) -> bool:
        return len(self.task_latency) + len(self.failed) < len(self.phases)

    def on_poll(self, t: float) -> None:
        now = int(t)
        for pool in self.pools.values():
            if pool.scaler and pool.policy and now % pool.policy.polling_interval == 0:
                self.scale(pool, now)
            if now % 60 == 0:
                pool.timeline.append(len(pool.workers))
        if now + self.poll_every < self.horizon or (
            self.outstanding() and now < self.horizon + DRAIN_LIMIT
        ):
            self.push(now + self.poll_every, self.on_poll)

    def scale(self, pool: PoolRun, now: int) -> None:
        assert pool.scaler is not None
        lag = len(pool.queue) + sum(len(w.running) for w in pool.workers)
        # KEDA reads the lag as Prometheus last scraped it: ``signal_age`` old.
        pool.lags.append((now, lag))
        while len(pool.lags) > 1 and pool.lags[1][0] <= now - pool.scaler.p.signal_age:
            pool.lags.popleft()
        lag = pool.lags[0][1] if pool.lags[0][0] <= now - pool.scaler.p.signal_age else 0
        demand = max(lag, sum(pool.expected.values()))  # KEDA: the larger trigger wins
        staying = [w for w in pool.workers if not w.leaving]
        change = pool.scaler.desired(now, demand, len(staying)) - len(staying)
        # Woken by announced steps alone: not by the backlog, nor by a cron floor.
        announced = lag <= pool.scaler.p.activation_lag_threshold < demand
        if not staying and change > 0 and announced:
            pool.woken_by_demand += 1
        for _ in range(change):
            w = Worker(started=now, ready_at=now + pool.spec.cold_start_s)
            pool.workers.append(w)
            self.push(w.ready_at, self.on_ready, pool, w)
        # Kubernetes removes not-ready pods first, then the least busy.
        by_cost = sorted(staying, key=lambda w: (w.ready_at <= now, len(w.running)))
        for w in by_cost[: max(0, -change)]:
            w.leaving = True
            w.warm.clear()
            w.kv_warm = 0
            if not w.running:
                pool.free(w, now)
        pool.peak = max(pool.peak, len(pool.workers))

    def on_ready(self, t: float, pool: PoolRun, w: Worker) -> None:
        if not w.freed and not w.leaving:
            self.warm(pool, t)
            self.dispatch(pool, t)

    # -- the orchestrator -----------------------------------------------------

    def decide(self, job: Job, now: float) -> Decision:
        key = (job.task, job.phase)
        preds = []
        for pool in self.pools.values():
            cached = job.prefix if any(w.holds(key) for w in pool.ready(now)) else 0
            preds.append(predict(job.need(cached), pool.spec, pool.now(now)))
        target = self.sc.targets_s.get(job.kind) if self.sc.spill else None
        return choose(preds, target)

    def on_release(self, t: float, job: Job) -> None:
        if job.task in self.failed:
            return
        step = self.steps[job.id]
        step.released = t
        decision = self.decide(job, t)
        step.reason = decision.reason
        chosen = decision.chosen
        if decision.pool is None or chosen is None:
            self.failed.add(job.task)
            self.forget(job.task)
            return
        pool = self.pools[decision.pool]
        step.pool, step.cold = decision.pool, not pool.ready(t)
        step.predicted_s = chosen.done_s
        if job.task in pool.expected:
            pool.expected[job.task] = max(0, pool.expected[job.task] - 1)
        pool.queue.append(job)
        self.dispatch(pool, t)

    def announce(self, plan: Job, now: float) -> None:
        """The plan started: wake the pools the task's later steps will use."""
        per_pool: dict[str, Counter[int]] = {}
        for phase in self.phases[plan.task][1:]:
            for job in phase:
                pool = self.decide(job, now).pool
                if pool is not None:
                    per_pool.setdefault(pool, Counter())[job.phase] += 1
        for name, counts in per_pool.items():
            self.pools[name].expected[plan.task] = max(counts.values())

    def plan_warm(self, job: Job, now: float) -> None:
        """A phase started: prefill the next phase's prefix where it will go."""
        phases = self.phases[job.task]
        if job.phase + 1 >= len(phases):
            return
        nxt = phases[job.phase + 1]
        tokens = max(j.prefix for j in nxt)
        pool = self.decide(nxt[0], now).pool
        if tokens and pool is not None:
            self.pools[pool].pending_warm.append(((job.task, job.phase + 1), tokens))
            self.warm(self.pools[pool], now)

    def warm(self, pool: PoolRun, now: float) -> None:
        ready = pool.ready(now)
        waiting = []
        for key, tokens in pool.pending_warm:
            if self.unstarted.get(key, 0) == 0 or key[0] in self.failed:
                continue
            roomy = [w for w in ready if w.kv_free(pool.spec) >= tokens]
            if roomy:
                max(roomy, key=lambda w: w.kv_free(pool.spec)).add_warm(key, tokens)
            else:
                waiting.append((key, tokens))
        pool.pending_warm = waiting

    def forget(self, task: int) -> None:
        for pool in self.pools.values():
            pool.expected.pop(task, None)
            for w in pool.workers:
                for key in [k for k in w.warm if k[0] == task]:
                    w.drop_warm(key)

    # -- a pool's workers -----------------------------------------------------

    def dispatch(self, pool: PoolRun, now: float) -> None:
        ready = pool.ready(now)
        if not ready or not pool.queue:
            return
        spec = pool.spec
        waiting: list[Job] = []
        looked, room = 0, self.room(ready, spec)
        for i, job in enumerate(pool.queue):
            if looked >= LOOKAHEAD or room < 0:
                waiting.extend(pool.queue[i:])
                break
            w = self.place(job, ready, spec) if job.kv <= room else None
            if w is None:
                waiting.append(job)
                looked += 1
            else:
                self.start(job, w, pool, now)
                room = self.room(ready, spec)
        pool.queue = waiting

    @staticmethod
    def room(ready: list[Worker], spec: PoolSpec) -> int:
        """The most KV one worker with a free slot could give (pre-warmed
        prefixes included: they give way); -1 when every slot is taken."""
        open_ = [kv_limit(spec) - w.kv_running if w.running else spec.max_model_len
                 for w in ready if len(w.running) < spec.max_seqs]  # fmt: skip
        return max(open_, default=-1)

    def place(self, job: Job, ready: list[Worker], spec: PoolSpec) -> Worker | None:
        if job.kv > min(spec.kv_tokens, spec.max_model_len):
            raise AssertionError(f"step {job.id} sent to pool {spec.name}, which cannot hold it")
        key = (job.task, job.phase)
        open_ = [w for w in ready if len(w.running) < spec.max_seqs]
        fits = [w for w in open_ if w.kv_free(spec, keep=key) >= job.kv]
        if not fits:
            # Pre-warmed prefixes give way first.
            # An idle worker runs a step larger than its budget alone (as admission does).
            roomy = [w for w in open_ if kv_limit(spec) - w.kv_running >= job.kv or not w.running]
            if not roomy:
                return None
            w = roomy[0]
            for k in list(w.warm):
                if w.kv_free(spec, keep=key) >= job.kv:
                    break
                if k != key:
                    w.drop_warm(k)
            return w
        warmed = [w for w in fits if w.holds(key)]
        return (warmed or sorted(fits, key=lambda w: -w.kv_free(spec)))[0]

    def start(self, job: Job, w: Worker, pool: PoolRun, now: float) -> None:
        key = (job.task, job.phase)
        cached = job.prefix if w.holds(key) else 0
        step = self.steps[job.id]
        step.prewarmed = key in w.warm
        step.prefill_saved_s = cached / pool.spec.prefill_tps
        w.drop_warm(key)
        w.phases[key] += 1
        w.running[job.id] = job.kv
        w.kv_running += job.kv
        prefill = (job.prompt - cached) / pool.spec.prefill_tps
        run = prefill + job.output / pool.spec.decode_tps
        step.started, step.ttft = now, now - step.released + prefill
        self.push(now + run, self.on_finish, pool, w, job)
        first = self.unstarted[key] == self.left[key]
        self.unstarted[key] -= 1
        if self.sc.prewarm and first:
            if job.phase == 0 and self.sc.announce:
                self.announce(job, now)
            self.plan_warm(job, now)

    def on_finish(self, t: float, pool: PoolRun, w: Worker, job: Job) -> None:
        key = (job.task, job.phase)
        w.kv_running -= w.running.pop(job.id)
        w.phases[key] -= 1
        self.steps[job.id].finished = t
        self.left[key] -= 1
        if w.leaving and not w.running:
            pool.free(w, t)
        if self.left[key] == 0 and job.task not in self.failed:
            phases = self.phases[job.task]
            if job.phase + 1 == len(phases):
                plan = phases[0][0]
                self.task_latency[job.task] = t - self.steps[plan.id].released
                self.forget(job.task)
            else:
                for nxt in phases[job.phase + 1]:
                    self.push(t + nxt.offset, self.on_release, nxt)
        self.dispatch(pool, t)


def replay(jobs: Iterable[Job], horizon: int, scenario: Scenario) -> Replayed:
    return Replay(list(jobs), horizon, scenario).run()
