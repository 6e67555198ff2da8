"""Helpers for the vLLM tier: run Baton's real worker in-process on the
session's shared engine, and play the orchestrator's part on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from baton.service import Health
from baton.transport import Bus, connect
from proto import codec, subjects
from proto.messages import (
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    InferenceJob,
    InferenceResult,
)
from proto.streams import RESULTS
from services.inference_worker.engines.base import Engine
from services.inference_worker.settings import WorkerSettings
from services.inference_worker.worker import Worker
from tests.harness import uid


@contextlib.asynccontextmanager
async def inprocess_worker(
    nats_url: str, engine: Engine, pool: str = "default", **settings: Any
) -> AsyncIterator[Worker]:
    """Baton's worker on an already started engine it does not own."""
    bus = await connect(nats_url, name=f"worker-{pool}")
    s = WorkerSettings(pool=pool, worker_id=uid("w"), **settings)
    worker = Worker(s, engine, Health(), manage_engine=False)
    task = asyncio.create_task(worker.run(bus))
    while not worker.health.ready:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        bus.stop()
        await asyncio.wait_for(task, 60)
        await bus.close()


async def submit_job(
    bus: Bus,
    tenant: str,
    text: str,
    *,
    max_tokens: int,
    pool: str = "default",
    session: str | None = None,
    system: str | None = "You are terse.",
) -> InferenceJob:
    """Append ``text`` to a session and publish a job pointing at it."""
    session = session or uid("s")
    reply: ContextAppendReply = await bus.request(
        subjects.context_api("append", tenant),
        ContextAppend(tenant=tenant, session=session, msg_id=uid("m"),
                      messages=[ChatMessage(role="user", content=text)], system=system),
        ContextAppendReply,
    )  # fmt: skip
    assert reply.ref is not None, reply.error
    job = InferenceJob(
        job_id=uid("j"), task_id=uid(), tenant=tenant, session=session, workflow="test",
        step="s1", agent="a", ref=reply.ref, max_tokens=max_tokens, published_at=time.time(),
    )  # fmt: skip
    await bus.publish(subjects.job(pool), job, msg_id=job.job_id, task_id=job.task_id)
    return job


async def collect_results(bus: Bus, tenant: str, n: int, timeout: float) -> list[InferenceResult]:
    """Take ``n`` results for ``tenant`` off the results work queue."""
    sub = await bus.js.pull_subscribe(f"{subjects.RESULTS}.{tenant}.>", durable=None,
                                      stream=RESULTS.name)  # fmt: skip
    got: list[InferenceResult] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(got)} of {n} results within {timeout}s")
            try:
                msgs = await sub.fetch(n - len(got), timeout=min(1.0, left))
            except TimeoutError:
                continue
            for msg in msgs:
                got.append(codec.decode(msg.data, InferenceResult))
                await msg.ack()
    finally:
        # Work-queue streams allow one consumer per filter: delete it now.
        name = (await sub.consumer_info()).name
        await sub.unsubscribe()
        await bus.js.delete_consumer(RESULTS.name, name)
    return got
