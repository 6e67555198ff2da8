"""Baton's real worker in-process on an engine it does not own: the vLLM
tier and the worker benchmarks share one engine per session this way."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from baton.bus import connect
from baton.service import Health
from services.inference_worker.engines.base import Engine
from services.inference_worker.settings import WorkerSettings
from services.inference_worker.worker import Worker


@contextlib.asynccontextmanager
async def inprocess_worker(
    nats_url: str, engine: Engine, pool: str = "default", **settings: Any
) -> AsyncIterator[Worker]:
    """Baton's worker on an already started engine it does not own."""
    bus = await connect(nats_url, name=f"worker-{pool}")
    s = WorkerSettings(pool=pool, worker_id=f"w{uuid.uuid4().hex[:12]}", **settings)
    worker = Worker(s, engine, Health(), bus, manage_engine=False)
    task = asyncio.create_task(worker.run())
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
