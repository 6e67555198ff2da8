"""The orchestrator's shell on the bus twin (``baton.dev.twin``): real
``Conductor`` replicas over one KV bucket, a context store that answers every
append and fork with a ref, and workers played by the test. Nothing here
decides: the conductor's own handlers and ``_apply`` do, in milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from baton.bus import Delivery, Request
from baton.dev.twin import TwinBucket, TwinBus
from baton.service import Health
from proto import codec, keys, subjects
from proto.context_api import answer_target
from proto.messages import (
    Budget,
    ChatMessage,
    ContextAnswer,
    ContextAppend,
    ContextAppendReply,
    ContextFork,
    ContextRef,
    ErrorInfo,
    ForkReply,
    InferenceJob,
    InferenceResult,
    TaskSubmit,
    Usage,
    WindowReply,
    WindowRequest,
)
from proto.streams import (
    JOBS,
    ORCHESTRATOR_RESULTS,
    ORCHESTRATOR_STREAMS,
    ORCHESTRATOR_TIMERS,
    RUNS,
    TOKENS,
    ConsumerSpec,
    input_consumer,
    task_consumer,
    tenant_tasks,
    worker_consumer,
)
from services.inference_worker.admission import Admission
from services.inference_worker.deltas import TokenPublisher
from services.inference_worker.engines.sim import SimEngine
from services.inference_worker.gpuclock import GpuClock
from services.inference_worker.heartbeat import WarmSessions
from services.inference_worker.jobs import JobHandler
from services.inference_worker.settings import WorkerSettings
from services.inference_worker.supervisor import EngineSupervisor
from services.orchestrator.conductor import Conductor
from services.orchestrator.runkeys import is_sealed, key_entry, unseal
from services.orchestrator.runs import RunStore
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.state import RunState
from services.orchestrator.workflows import GraphWorkflow

TENANT = "acme"
WORKERS = ConsumerSpec(JOBS.name, "test-workers", f"{subjects.JOBS}.>", ack_wait=30.0,
                       max_deliver=-1)  # fmt: skip
TASKS, RESULTS, TIMERS, INPUTS = (task_consumer(TENANT).durable, ORCHESTRATOR_RESULTS.durable,
                                  ORCHESTRATOR_TIMERS.durable, input_consumer(TENANT).durable)  # fmt: skip


class _ContextStore:
    """Answers appends (the first under a msg id is kept, as the store keeps
    it), forks and windows (a session's messages; ``existing``: the answer
    already appended under ``done_msg_id``). Refs are not signed."""

    def __init__(self, bus: TwinBus) -> None:
        self.bus = bus
        self.versions: dict[str, int] = {}
        self.appends: dict[str, ContextAppend] = {}  # by msg id: the first one stored
        self.refs: dict[str, ContextRef] = {}  # by msg id: the ref its append returned
        self.sessions: dict[str, list[ChatMessage]] = {}

    async def __call__(self, req: Request) -> Any:
        op = req.subject.split(".")[2]
        if op == "append":
            return self._append(codec.decode(req.data, ContextAppend))
        if op == "answer":  # the answer appended, its last delta then its result published
            q = codec.decode(req.data, ContextAnswer)
            t = answer_target(q)
            t.result.ref = self._append(ContextAppend(tenant=q.tenant, session=t.session,
                                                      msg_id=t.append_id, messages=[q.answer],
                                                      base=q.base)).ref  # fmt: skip
            if q.last_delta is not None and q.result is not None:
                d, job_id = q.last_delta, q.result.job_id
                await self.bus.publish(subjects.tokens(q.tenant, t.task_id), d,
                                       msg_id=keys.token_delta(job_id, d.attempt, d.index))  # fmt: skip
            await self.bus.publish_for(t.subject, t.result, reply=req.reply, msg_id=t.result_id)
            return None
        if op == "window":
            w = codec.decode(req.data, WindowRequest)
            done = self.appends.get(w.done_msg_id or "")
            if done is not None:
                return WindowReply(existing=done.messages[-1], existing_ref=self.refs[done.msg_id])
            msgs = self.sessions.get(w.ref.session, [])[: w.ref.version]
            return WindowReply(messages=msgs, tokens=sum(len(m.content) // 4 + 1 for m in msgs))
        f = codec.decode(req.data, ContextFork)
        return ForkReply(ref=ContextRef(f.tenant, f.child, f.upto or f.ref.version, b"sig"))

    def _append(self, a: ContextAppend) -> ContextAppendReply:
        if a.msg_id not in self.appends:
            self.appends[a.msg_id] = a
            self.sessions.setdefault(a.session, []).extend(a.messages)
            self.versions[a.session] = self.versions.get(a.session, 0) + len(a.messages)
            self.refs[a.msg_id] = ContextRef(a.tenant, a.session, self.versions[a.session],
                                             b"sig")  # fmt: skip
        return ContextAppendReply(ref=self.refs[a.msg_id])


@dataclass
class Shell:
    twin: TwinBus
    kv: TwinBucket
    conductors: list[Conductor]
    store: _ContextStore
    answered: set[str] = field(default_factory=set)  # job msg ids a worker answered

    @classmethod
    async def start(
        cls, workflows: dict[str, GraphWorkflow], *, replicas: int = 1, **settings: Any
    ) -> Shell:
        twin = TwinBus()
        await twin.provision(
            streams=[*ORCHESTRATOR_STREAMS, tenant_tasks(TENANT)],
            consumers=[task_consumer(TENANT), input_consumer(TENANT), ORCHESTRATOR_RESULTS,
                       ORCHESTRATOR_TIMERS, WORKERS],
        )  # fmt: skip
        kv = await twin.ensure_bucket(RUNS)
        assert isinstance(kv, TwinBucket)
        s = OrchestratorSettings(**settings)
        conductors = [Conductor(twin, RunStore(kv), workflows, s, clock=twin.now)
                      for _ in range(replicas)]  # fmt: skip
        store = _ContextStore(twin)
        ops = ("append", "answer", "fork", "window")
        await twin.serve([f"{subjects.CONTEXT_API}.{op}.*" for op in ops], store)
        return cls(twin, kv, conductors, store)

    async def job_handler(self, **settings: Any) -> JobHandler:
        """The worker's job handler on the twin, on the simulator engine
        (as ``Worker.run`` wires it, without the pull loops and heartbeats)."""
        s = WorkerSettings(worker_id="w1", **settings)
        engine = SimEngine(prefill_tps=1e6, decode_tps=1e5)
        sup = EngineSupervisor(s, engine, Health(), Admission(1, 1))
        await sup.start()
        tokens = TokenPublisher(self.twin, 0.0)
        await self.twin.provision(streams=[TOKENS], consumers=[worker_consumer(s.pool)])
        return JobHandler(sup, self.twin, WarmSessions(8), GpuClock(), tokens)

    async def submit(
        self, workflow: str, task_id: str, text: str = "compare two sorts", **kw: Any
    ) -> None:
        body = TaskSubmit(tenant=TENANT, input=text, task_id=task_id, **kw)
        await self.twin.publish(subjects.tenant_task(TENANT, workflow), body, msg_id=task_id)

    def handler(self, durable: str, replica: int = 0) -> Callable[[Delivery], Any]:
        c = self.conductors[replica % len(self.conductors)]

        async def on_task(d: Delivery) -> None:
            await c.on_task(d)

        return {TASKS: on_task, RESULTS: c.on_result, TIMERS: c.on_timer, INPUTS: c.on_input}[
            durable
        ]

    async def handle(self, durable: str, *, replica: int = 0, pick: int = 0) -> bool:
        """One ready message of ``durable`` (the ``pick``-th, wrapping) to a
        replica's handler, settled by its outcome; False: none was ready."""
        ready = self.twin.ready(durable)
        if not ready:
            return False
        seq = ready[pick % len(ready)]
        return await self.twin.deliver(durable, self.handler(durable, replica), seq)

    async def work(
        self, pick: int = 0, *, output: Callable[[InferenceJob], str] = lambda j: "ok",
        error: bool = False, copies: int = 1,
    ) -> InferenceJob | None:  # fmt: skip
        """A worker answers one ready job (``copies``: its result published
        that many times with distinct msg ids, as after lost acks)."""
        ready = self.twin.ready(WORKERS.durable)
        if not ready:
            return None
        taken: list[InferenceJob] = []

        async def answer(d: Delivery) -> None:
            job = d.decode(InferenceJob)
            taken.append(job)
            if d.msg_id:
                self.answered.add(d.msg_id)
            err = ErrorInfo(code="engine_failure", message="boom", layer="inference")
            res = InferenceResult(
                job_id=job.job_id, task_id=job.task_id, tenant=job.tenant, session=job.session,
                step=job.step, worker="w1", output=output(job),
                ref=ContextRef(job.tenant, job.session, 3, b"sig"),
                usage=Usage(prompt_tokens=10, completion_tokens=5, gpu_seconds=0.01),
                error=err if error else None,
            )  # fmt: skip
            for i in range(copies):
                mid = keys.result(job.job_id, job.attempt) + (f"#{i}" if i else "")
                await self.twin.publish(subjects.result(job.tenant, job.task_id), res,
                                        msg_id=mid, task_id=job.task_id)  # fmt: skip

        await self.twin.deliver(WORKERS.durable, answer, ready[pick % len(ready)])
        return taken[0] if taken else None

    async def settle_all(self, *, limit: int = 500, replica: int = 0) -> None:
        """Run the world quietly: every ready message handled, every job
        answered, the clock moved on to the next nak's delay or watchdog
        when nothing is ready, until nothing waits."""
        durables = (TASKS, RESULTS, INPUTS, TIMERS)
        for i in range(limit):
            for durable in durables:
                if await self.handle(durable, replica=replica + i):
                    break
            else:
                if await self.work() is None:
                    due = [self.twin.next_due(d) for d in durables]
                    at = min((t for t in due if t is not None), default=None)
                    if at is None:
                        return
                    self.twin.advance(max(0.0, at - self.twin.now()) + 0.001)

    async def run(self, task_id: str) -> RunState | None:
        return await self.conductors[0].runs.get(TENANT, task_id)

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return [
            codec.decode_any(m.data) for m in self.twin.messages(subjects.event(TENANT, task_id))
        ]

    def stored(self, task_id: str) -> list[RunState]:
        """Every state of the run ever stored, in order."""
        key = f"{TENANT}.{task_id}"
        [k] = [e.value for e in self.kv.log if e.key == key_entry(key)]
        return [codec.decode(unseal(k, key, e.value) if is_sealed(e.value) else e.value, RunState)
                for e in self.kv.log if e.key == key]  # fmt: skip


def budget(tokens: int | None) -> dict[str, Any]:
    return {"budget": Budget(max_tokens=tokens)} if tokens else {}
